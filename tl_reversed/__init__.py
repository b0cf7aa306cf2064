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

# Load the public module paths before binding the functions that share their names
# (``reversed_attention``, ``backward_lens``): a first import of such a path later
# would otherwise replace the function attribute with the module.
import tl_reversed.backward_lens  # noqa: F401
import tl_reversed.reversed_attention  # noqa: F401
from tl_reversed.core.cache import cache_with_grads, ra_from_cache
from tl_reversed.core.memory import WouldRunOutOfMemory
from tl_reversed.core.models import load_model
from tl_reversed.core.reversed_attention import ReversedAttention, ra_from_parts, reversed_attention
from tl_reversed.lens.backward_lens import BackwardLens, backward_lens, backward_lens_and_ra, gradient_rank

__version__ = "0.1.0"

__all__ = [
    "BackwardLens",
    "backward_lens",
    "backward_lens_and_ra",
    "gradient_rank",
    "ReversedAttention",
    "WouldRunOutOfMemory",
    "cache_with_grads",
    "load_model",
    "ra_from_cache",
    "ra_from_parts",
    "reversed_attention",
]
