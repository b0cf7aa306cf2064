"""Reversed Attention (Katz & Wolf, NAACL 2025) for TransformerLens.

The package is layered; imports go one way::

    core         model description and quirks, inputs, the pass engine, RA, caches, state, loading
    experiments  tasks, head rankings, the perturbation test, attention patching, evaluation
    lens         the backward lens
    views        figures and HTML pages (results delegate to them with a lazy import)
    commands     the ``tl-reversed`` command line

The public module paths of the first release (``tl_reversed.reversed_attention``,
``tl_reversed.tasks``, ``tl_reversed.ranking``, ``tl_reversed.perturbation``,
``tl_reversed.attention_patching``, ``tl_reversed.plotting``, ``tl_reversed.html``,
``tl_reversed.backward_lens``, ``tl_reversed.cache``, ``tl_reversed.models``,
``tl_reversed.testing``, ``tl_reversed.cli``) are the same module objects as their
homes in the layers.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# The public names are loaded on first use (PEP 562), so that ``import tl_reversed`` and
# the command line's ``--help`` do not import torch.
_PUBLIC = {
    "BackwardLens": "tl_reversed.lens.backward_lens",
    "backward_lens": "tl_reversed.lens.backward_lens",
    "backward_lens_and_ra": "tl_reversed.lens.backward_lens",
    "gradient_rank": "tl_reversed.lens.backward_lens",
    "ReversedAttention": "tl_reversed.core.reversed_attention",
    "WouldRunOutOfMemory": "tl_reversed.core.memory",
    "FlowGraph": "tl_reversed.lens.flow_results",
    "cache_with_grads": "tl_reversed.core.cache",
    "flow_graph": "tl_reversed.lens.flow_graph",
    "load_model": "tl_reversed.core.models",
    "ra_from_cache": "tl_reversed.core.cache",
    "ra_from_parts": "tl_reversed.core.reversed_attention",
    "reversed_attention": "tl_reversed.core.reversed_attention",
}

__all__ = sorted(_PUBLIC, key=str.lower)


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """The package module: ``tl_reversed.reversed_attention`` and ``tl_reversed.backward_lens``
    stay the functions, also after ``import tl_reversed.reversed_attention``.

    Importing a submodule binds it on its package (``setattr(tl_reversed, "reversed_attention",
    module)``), which would replace the function of the same name with the module. The
    package keeps the function instead; the module stays in ``sys.modules`` under both
    paths.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
