"""The error tree: every exception mailgate raises on purpose lives in mailgate/errors.py, drawn there."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import mailgate
from mailgate import errors
from mailgate.errors import MailgateError


def _modules() -> list[str]:
    return [
        info.name
        for info in pkgutil.walk_packages(mailgate.__path__, "mailgate.")
        # the stand-in API is not mailgate's own tree; __main__ runs the command on import
        if not info.name.startswith("mailgate.sandbox") and not info.name.endswith("__main__")
    ]


def test_every_mailgate_error_is_defined_in_errors_and_drawn_in_its_docstring() -> None:
    """No module defines its own MailgateError subclass; each class of errors.py appears in the tree."""
    outside = []
    for name in _modules():
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, MailgateError) and cls.__module__ == name and name != "mailgate.errors":
                outside.append(f"{name}.{cls_name}")
    assert outside == []
    drawn = errors.__doc__ or ""
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, MailgateError)]
    assert len(classes) > 10
    assert [c.__name__ for c in classes if c.__name__ not in drawn] == []
