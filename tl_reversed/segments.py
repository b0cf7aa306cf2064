"""Segment-by-segment prefill masks (MAS: Katz, Ringel, Romano & Wolf, ACL 2025).

The prompt is cut into segments; during prefill every token attends to its whole
segment and to the earlier ones, and generation continues causally::

    import tl_reversed
    from tl_reversed import segments

    tokens, ids = segments.tokenize_pieces(model, ["You are terse.", " Name a colour:"])
    with segments.segment_attention(model, ids):
        logits = model(tokens[None])                    # prefill under the segment mask
    out = segments.generate(model, ["You are terse.", " Name a colour:"], max_new_tokens=5)
    ra = tl_reversed.reversed_attention(model, tokens[None], " red", segments=ids)

The functions live in :mod:`tl_reversed.core.segments` (ids, masks, ``segment_attention``)
and :mod:`tl_reversed.core.segment_generation` (``generate``).
"""

from tl_reversed.core.segment_generation import SegmentGeneration, generate
from tl_reversed.core.segments import (
    PAD_ID,
    chat_pieces,
    prefill_mask,
    segment_attention,
    segment_ids,
    tokenize_batch,
    tokenize_pieces,
)

__all__ = [
    "PAD_ID",
    "SegmentGeneration",
    "chat_pieces",
    "generate",
    "prefill_mask",
    "segment_attention",
    "segment_ids",
    "tokenize_batch",
    "tokenize_pieces",
]
