"""The memory-bounded RA pass: each block checkpointed, attention in query tiles, RA from the tiles.

The standard pass keeps, for the backward, every layer's activations, among them each
layer's ``[head, query_pos, key_pos]`` attention pattern: memory grows with
layers x heads x tokens^2. The bounded pass runs the same forward and backward with every
block under non-reentrant activation checkpointing (:func:`torch.utils.checkpoint.checkpoint`),
scoped to the model at hand (:func:`checkpointed_blocks`):

* forward: each block runs with its saved activations dropped; only each block's input
  (the residual stream, ``[batch, pos, d_model]`` per layer, linear in tokens) is kept;
* backward: when the gradient reaches block ``l``, the block is recomputed from its
  input, and its backward runs on the recomputed activations.

In :func:`tl_reversed.reversed_attention` (and ``head_scores("ra" | "fa")``, which call
it), where the model's attention can take it (GPT-2, Llama, Gemma 3 and the other
``PositionEmbeddingsAttentionBridge`` models under the TransformerBridge; see
:mod:`tl_reversed.core.attention_seams`), attention itself runs in query tiles
(:mod:`tl_reversed.core.tiled_attention`): no layer's ``[head, T, T]`` scores or pattern
exist at any moment, in the forward, the recomputation or the backward, only
``[batch, head, tile, T]`` tiles (``tile`` from :data:`tl_reversed.core.rows.TILE_ELEMENTS`),
and the attention's backward hands each tile's pattern and ``dL/dA`` to the RA sink's
:class:`~tl_reversed.core.rows.TileReducer`. What stays in memory then: the block inputs,
one block's recomputed activations with its q, k, v, output and row log-sum-exp
(``[batch, head, T]``), one tile, and the model's own ``[batch, 1, T, T]`` attention mask,
which Hugging Face builds once per forward for all layers (4 bytes per entry: 256 MiB at
8k tokens). ``hook_pattern`` and ``hook_attn_scores`` do not fire there; a call that hooks
them is refused.

Elsewhere (attention the bridge delegates to Hugging Face: OPT, GPT-J, GPT-Neo; the
HookedTransformer of TransformerLens 2.x/3.x), and on the bounded pass of every other
entry point on every model (``cache_with_grads``, the backward lens and
``backward_lens_and_ra``: they run no tiles), the recomputed block runs the model's own
eager attention: only then do the RA sink's forward hooks keep ``hook_pattern`` and
``hook_v`` of layer ``l`` (the ``gate``), and the backward hook on ``hook_z`` reduces them,
a query tile at a time (:func:`tl_reversed.core.rows.reduce_layer`). One layer's
``heads x tokens^2`` pattern is alive at a time there; the ``layers x`` factor is gone.

Key/value caches are not used by a single pass; a block's cache argument (a Hugging
Face ``Cache``) is dropped so the recomputation does not append to it a second time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from tl_reversed.core.architecture import ModelSpec

BOUNDED_ABOVE_BYTES = 2**30
"""``path="auto"`` takes the bounded pass when the standard pass would keep more attention.

The estimate is the patterns the standard pass keeps for its backward:
``rows per pass x layers x heads x tokens^2 x bytes per element`` of the model's dtype.
"""


@dataclass
class Recompute:
    """Which block is being recomputed in the backward (``None`` during the forward)."""

    layer: int | None = None
    forward_done: set[int] = field(default_factory=set)

    def recomputing(self, layer: int) -> bool:
        return self.layer == layer


def _is_cache(value: object) -> bool:
    return any(cls.__module__.startswith("transformers.cache_utils") for cls in type(value).__mro__)


def _without_cache(kwargs: dict) -> dict:
    cleaned = {key: None if _is_cache(value) else value for key, value in kwargs.items()}
    if "use_cache" in cleaned:
        cleaned["use_cache"] = False
    return cleaned


@contextmanager
def checkpointed_blocks(model: torch.nn.Module) -> Iterator[Recompute]:
    """Run every block of ``model`` under activation checkpointing for the duration.

    Sets an instance attribute ``forward`` on each block (the class and every other model
    are untouched) and removes it on the way out, also after an exception. Yields a
    :class:`Recompute` that says which block is being recomputed.
    """
    state = Recompute()
    blocks = list(model.blocks)  # type: ignore[attr-defined]
    taken = [i for i, block in enumerate(blocks) if "forward" in vars(block)]
    if taken:
        raise RuntimeError(
            f"blocks {taken} already have their forward replaced on this model instance (another "
            "checkpointing wrapper?): remove it, or call reversed_attention(..., path='standard')"
        )

    def wrap(layer: int, block: torch.nn.Module):
        original = type(block).forward

        def recomputable(*args, **kwargs):
            recompute = layer in state.forward_done
            state.layer = layer if recompute else None
            try:
                return original(block, *args, **kwargs)
            finally:
                state.layer = None

        def forward(*args, **kwargs):
            state.forward_done.discard(layer)
            if not torch.is_grad_enabled():
                return original(block, *args, **kwargs)
            out = checkpoint(recomputable, *args, use_reentrant=False, **_without_cache(kwargs))
            state.forward_done.add(layer)
            return out

        return forward

    try:
        for layer, block in enumerate(blocks):
            # object.__setattr__: the bridge forwards unknown attributes to the wrapped HF module
            object.__setattr__(block, "forward", wrap(layer, block))
        yield state
    finally:
        for block in blocks:
            vars(block).pop("forward", None)


def standard_pattern_bytes(spec: ModelSpec, n_layers: int, rows: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of the attention patterns the standard pass keeps for its backward (one chunk)."""
    return rows * n_layers * spec.n_heads * tokens * tokens * torch.finfo(dtype).bits // 8


def choose_path(path: str, keep: str, query_positions: object, estimate: int) -> str:
    """``"standard"`` or ``"bounded"`` for ``path="auto"`` (see :data:`BOUNDED_ABOVE_BYTES`).

    ``auto`` keeps whole maps on the standard path: they are ``layers x heads x tokens^2``
    themselves, so the bounded pass saves little there.
    """
    if path != "auto":
        return path
    whole_maps = keep == "maps" and query_positions is None
    return "bounded" if not whole_maps and estimate > BOUNDED_ABOVE_BYTES else "standard"
