"""Resolving the `module:callable` and `path/file.py:callable` specs users pass to --model and --data."""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Callable

from .errors import UserError


def import_callable(spec: str, flag: str) -> Callable[..., Any]:
    """The callable named by `spec`; `flag` (e.g. '--model') only shapes the error messages."""
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            if not os.path.isfile(target):
                raise UserError(f"file not found: {target} (from {flag} {spec})")
            mod_spec = importlib.util.spec_from_file_location(os.path.basename(target)[:-3], target)
            assert mod_spec and mod_spec.loader
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise UserError(f"cannot import {target!r} for {flag} {spec}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UserError(f"{target} has no callable {attr!r} (from {flag} {spec})")
    return fn
