"""Reversed Attention (Katz & Wolf, NAACL 2025) for TransformerLens."""

from tl_reversed.backward_lens import BackwardLens, backward_lens, backward_lens_and_ra, gradient_rank
from tl_reversed.cache import cache_with_grads, ra_from_cache
from tl_reversed.models import load_model
from tl_reversed.reversed_attention import ReversedAttention, ra_from_parts, reversed_attention

__version__ = "0.1.0"

__all__ = [
    "BackwardLens",
    "backward_lens",
    "backward_lens_and_ra",
    "gradient_rank",
    "ReversedAttention",
    "cache_with_grads",
    "load_model",
    "ra_from_cache",
    "ra_from_parts",
    "reversed_attention",
]
