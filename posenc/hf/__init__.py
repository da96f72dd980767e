"""Hugging Face transformers integration: `patch` / `unpatch` pretrained models (see patching.py for how).

Importing this package does not import transformers (it is slow to import, and optional): rope type "posenc"
is registered with transformers the moment `transformers.modeling_rope_utils` is imported (at once if it
already is), so `import posenc` is all a user needs before `from_pretrained` on a patched checkpoint.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from .families import FAMILIES, SUPPORTED
from .patching import POSENC_ROPE_TYPE, current_patch, is_patched, patch, register, unpatch

__all__ = ["patch", "unpatch", "is_patched", "current_patch", "register", "FAMILIES", "SUPPORTED", "POSENC_ROPE_TYPE"]

_ROPE_UTILS = "transformers.modeling_rope_utils"


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: runs `register` right after transformers.modeling_rope_utils executes."""

    def find_spec(self, name, path=None, target=None):
        if name != _ROPE_UTILS:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            register(module)

        spec.loader.exec_module = exec_and_register
        return spec


def _register_with_transformers() -> None:
    module = sys.modules.get(_ROPE_UTILS)
    if module is not None:
        register(module)
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


_register_with_transformers()
