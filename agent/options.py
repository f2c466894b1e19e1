"""Calling a user-named factory with keyword options from config, with a clear error on a mismatch.

Both `agent.trainer.load_trainer` (custom `module:object` trainers) and
`agent.tasks.make_task` (the built-in tasks) build objects from config options;
this module sits below both so neither imports the other to share it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from proto.errors import InvalidInput


def call_with_options(factory: Callable[..., Any], options: Mapping[str, Any], *, what: str) -> Any:
    """Call ``factory(**options)``, turning an options/signature mismatch into InvalidInput.

    The signature is checked before the call so that a TypeError raised *inside* the
    factory is not mistaken for bad options.
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None  # some builtins have no introspectable signature; just call
    if signature is not None:
        try:
            signature.bind(**options)
        except TypeError as exc:
            raise InvalidInput(f"bad options for {what}: {exc}", reason="bad_trainer_options") from exc
    return factory(**options)
