"""Shared fixtures: everything runs in the test's own event loop, on real sockets bound to port 0."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
