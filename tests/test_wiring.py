"""Wiring in one place (issue 10.4): components are built by mailgate/service.py's factories only."""

from __future__ import annotations

import re
from pathlib import Path

import mailgate

PACKAGE = Path(mailgate.__file__).parent
BUILDS = re.compile(r"\bHandingerClient\(|\b(?:SqliteStore|PostgresStore)\.open\(")


def test_the_store_and_the_api_client_are_built_only_by_the_service_factories() -> None:
    """Outside service.py (and the store package, which opens itself for `copy`), no module constructs
    the API client or opens a store: `serve`, `check` and the operator verbs share `open_store` and
    `make_api_client`."""
    builders = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if BUILDS.search(path.read_text(encoding="utf-8"))
        and path.name != "service.py"
        and path.parent.name not in ("store", "sandbox")
    )
    assert builders == []
