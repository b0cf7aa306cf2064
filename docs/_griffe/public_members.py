"""Griffe extension for the API reference: document what a module defines, not what it imports.

The reference is built by importing the public modules (``force_inspection``), so that
``tl_reversed.ranking`` and friends resolve whatever module they are an alias of. Inspection
cannot tell an imported helper from the module's own functions, so this decides from the
running module: a member is public when it is in the module's ``__all__`` (if it has one),
else when its ``__module__`` is the module's own ``__name__``.
"""

from __future__ import annotations

import importlib
from typing import Any

import griffe


class PublicMembers(griffe.Extension):
    def on_class(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        for name, member in cls.members.items():
            if name.startswith("_"):
                member.public = False  # __dataclass_fields__ and the like

    def on_module(self, *, mod: griffe.Module, **kwargs: Any) -> None:
        try:
            runtime = importlib.import_module(mod.path)
        except Exception:  # noqa: BLE001 - not importable: leave griffe's own rules
            return
        exported = getattr(runtime, "__all__", None)
        for name, member in mod.members.items():
            if name.startswith("_"):
                member.public = False  # dunders such as __file__ included
                continue
            if name == "TYPE_CHECKING":
                member.public = False
                continue
            if exported is not None:
                member.public = name in exported
                continue
            value = getattr(runtime, name, None)
            home = getattr(value, "__module__", None)
            if home is not None and not isinstance(value, (str, int, float, tuple, dict, list, frozenset)):
                member.public = home == runtime.__name__
