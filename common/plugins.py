"""Plug-ins named by `module.path:function`: the user's embedding network (--model) and data set
loader (--dataset). Only the name travels in the RunConfig; every process that needs the code
(the coordinator for the tensor schema, every peer to build and train) imports it itself.

This module resolves names only; what a plug-in must return is checked where it is used
(common/data.py for loaders, peer/embedding_plugin.py for models).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any

# A dotted module path, a colon, one function name: `pkg.mod:make`. ASCII identifiers only, so
# that a typo or a path (`./my.py`) is refused at parse time, not in every peer later.
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_SPEC = re.compile(rf"({_IDENT}(?:\.{_IDENT})*):({_IDENT})", re.ASCII)
SPEC_FORM = "MODULE:FUNCTION (e.g. mypkg.models:make_embedding)"


class PluginError(ValueError):
    """A plug-in cannot be imported or returned something unusable; the message is for users."""


def is_plugin_spec(text: str) -> bool:
    return _SPEC.fullmatch(text) is not None


def parse_spec(spec: str, flag: str) -> tuple[str, str]:
    """(module, function) of `spec`; PluginError naming `flag` when it is not of that form."""
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise PluginError(f"{flag} {spec!r} is not of the form {SPEC_FORM}")
    return match.group(1), match.group(2)


def load_plugin(spec: str, flag: str) -> Callable[..., Any]:
    """Import `spec`'s module and return its function; a PluginError that names the spec, the
    module and where Python looked when that fails."""
    module_name, function = parse_spec(spec, flag)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise PluginError(
                f"{flag} {spec}: cannot import module {module_name!r} ({exc}); every process of "
                "the run (coordinator and peers) must be able to import it: install it, or put "
                "the folder holding it on PYTHONPATH (e.g. PYTHONPATH=/path/to/dir fedmoe ...); "
                f"sys.path here is {sys.path}"
            ) from exc
        # The module exists but imports something missing: say so, not "no such module".
        raise PluginError(
            f"{flag} {spec}: module {module_name!r} was found but importing it failed: {exc}"
        ) from exc
    except Exception as exc:  # a plug-in's own import-time error, reported with its type
        raise PluginError(
            f"{flag} {spec}: importing module {module_name!r} failed ({type(exc).__name__}: {exc})"
        ) from exc
    target = getattr(module, function, None)
    if target is None:
        raise PluginError(
            f"{flag} {spec}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
            f"attribute {function!r}"
        )
    if not callable(target):
        raise PluginError(f"{flag} {spec}: {function!r} is a {type(target).__name__}, not callable")
    return target  # type: ignore[no-any-return]


def import_roots(specs: list[str]) -> list[str]:
    """The folders this process imported the plug-ins of `specs` from (already imported, e.g.
    by a check): `fedmoe local` puts them on its children's PYTHONPATH, so that a module this
    process can import (a script's folder, say) is one its peers can import too."""
    roots: list[str] = []
    for spec in specs:
        if not is_plugin_spec(spec):
            continue
        top = sys.modules.get(spec.split(":")[0].split(".")[0])
        if top is None:
            continue
        paths = list(getattr(top, "__path__", []))  # a package: its folder's parent
        file = getattr(top, "__file__", None)
        if paths:
            root = os.path.dirname(os.path.abspath(paths[0]))
        elif file:
            root = os.path.dirname(os.path.abspath(file))
        else:
            continue
        if root not in roots:
            roots.append(root)
    return roots
