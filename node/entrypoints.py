"""`"package.module:name"` references to a team's own code, resolved with errors that help.

Configs name a model factory (``[model] factory``), a data loader (``[data] loader``) and a
trainer class (``[train] trainer``) this way, as Python's own entry points do. Resolving one
imports the module from the node's environment (an installed package, or a folder on
PYTHONPATH) and fetches the attribute, which may be dotted (``module:Class.method``).

Every failure is an `EntryPointError` (exit code CONFIG) naming the config field, the
reference, what went wrong and what to do: a module that is not installed is told apart from
one that is installed but fails to import (its own missing dependency, a syntax error), which
is the difference between "install your package on this node" and "fix your package".
Nothing here imports torch.
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import Any

from node.errors import ExitCode, FedbusError

__all__ = ["ENTRY_POINT_PATTERN", "EntryPointError", "load_entry_point"]

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
ENTRY_POINT_PATTERN = rf"^{_DOTTED}:{_DOTTED}$"
_ENTRY_POINT = re.compile(ENTRY_POINT_PATTERN)


class EntryPointError(FedbusError):
    """A `package.module:name` reference that cannot be used; the message says why."""

    exit_code = ExitCode.CONFIG


def _not_installed(module: str, exc: ModuleNotFoundError) -> bool:
    """True when `exc` is about `module` itself or a package above it, not a dependency."""
    missing = exc.name or ""
    return bool(missing) and (module == missing or module.startswith(missing + "."))


def load_entry_point(reference: str, *, field: str, callable_: bool = True) -> Any:
    """The object `reference` ("package.module:name") names; EntryPointError otherwise.

    `field` is the config field it came from (e.g. "model.factory"), for the message.
    """
    if not isinstance(reference, str) or not _ENTRY_POINT.match(reference):
        raise EntryPointError(
            f"{field} = {reference!r} is not a 'package.module:name' reference "
            f"(e.g. 'hospital_ml.models:build_net')"
        )
    module_name, _, attribute = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if _not_installed(module_name, exc):
            raise EntryPointError(
                f"{field} = {reference!r}: no module named {exc.name!r} in this environment "
                f"({sys.executable}); install the package that provides {module_name!r} "
                f"on this node, or put the folder that holds it on PYTHONPATH"
            ) from None
        raise EntryPointError(
            f"{field} = {reference!r}: importing {module_name!r} failed, it needs a module "
            f"this environment lacks: {exc}"
        ) from exc
    except Exception as exc:  # the team's module raised while importing: show what
        raise EntryPointError(
            f"{field} = {reference!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            where = getattr(module, "__file__", None) or module_name
            raise EntryPointError(
                f"{field} = {reference!r}: {module_name!r} ({where}) has no attribute {attribute!r}"
            ) from None
    if callable_ and not callable(target):
        raise EntryPointError(
            f"{field} = {reference!r} is a {type(target).__name__}, not a function or class"
        )
    return target
