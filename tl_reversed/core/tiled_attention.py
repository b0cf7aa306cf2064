"""Causal attention in query tiles, and RA reduced from the same tiles in its backward.

For one layer with queries ``Q`` ``[batch, head, T, d]`` (after rotary), keys and values
``K, V`` ``[batch, kv_head, T, d]`` (grouped-query heads share them: head ``h`` reads
kv head ``h // (head / kv_head)``), the QK scale ``c``, an optional soft cap ``s`` and the
model's additive mask ``M``::

    S   = cap(Q K^T c) + M          cap(x) = s tanh(x / s), or x without soft-capping
    A   = softmax(S)                 one row at a time: A = exp(S - lse(S))
    Z   = A V

:class:`TiledAttention` computes ``Z`` ``tile`` query rows at a time and saves only
``Q, K, V, Z`` and the row log-sum-exp ``lse`` ``[batch, head, T]`` for the backward
(the flash-attention recipe): no ``[T, T]`` scores or pattern of a layer exists at any
moment, only ``[batch, head, tile, T]`` ones. Its backward recomputes each tile's pattern
and, with ``dZ`` the gradient of ``Z`` (the gradient at ``hook_z``)::

    G   = dZ V^T                     dL/dA                            (RA paper eq. 14)
    dS  = A * (G - rowsum(dZ * Z))   rowsum(dZ * Z) = rowsum(A * G)
    dQ  = cap'(.) dS K c,  dK = (cap'(.) dS)^T Q c,  dV = A^T dZ

and hands ``A`` and ``G`` of the tile (with ``dZ`` and ``V``) to an observer (:class:`tl_reversed.core.rows.TileReducer`),
which turns them into RA (``A * (G - rowsum(A * G)) * c``) norms and kept rows: RA is
reduced from the very tiles the backward needs anyway.

Pure PyTorch, exact to the eager computation up to float rounding; the scores are made in
the model dtype (forward and backward alike, so the backward's pattern is the one whose
``lse`` the forward saved) and the softmax runs in float32 for half-precision models
(float64 stays float64), as the eager bridge does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from jaxtyping import Float
from torch import Tensor

MaskTile = Callable[[Tensor, int, int], Tensor]
"""``mask(scores, start, stop)``: the masked scores of query rows ``start:stop`` ``[batch, head, rows, key]``."""


class TileObserver(Protocol):
    """What the backward hands each tile's pattern and ``dL/dA`` to."""

    def add(self, start: int, pattern: Tensor, grad_pattern: Tensor, grad_out: Tensor, values: Tensor) -> None: ...

    def finish(self) -> None: ...


def tile_rows(n: int, n_heads: int, width: int, elements: int) -> int:
    """Query rows per tile so that one ``[batch, head, rows, key]`` tile holds at most ``elements``."""
    return max(1, elements // max(1, n * n_heads * width))


def causal_mask(scores: Tensor, start: int, stop: int) -> Tensor:
    """The plain causal mask of query rows ``start:stop`` (keys after the query get ``-inf``)."""
    width = scores.shape[-1]
    future = torch.arange(width, device=scores.device)[None] > torch.arange(start, stop, device=scores.device)[:, None]
    return scores.masked_fill(future, float("-inf"))


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _expand(x: Tensor, n_heads: int) -> Tensor:
    """Key/value heads repeated to one per query head (``[batch, head, T, d]``), as Hugging Face's ``repeat_kv``."""
    return x if x.shape[1] == n_heads else x.repeat_interleave(n_heads // x.shape[1], dim=1)


def _fold(x: Tensor, n_kv: int) -> Tensor:
    """The gradient of :func:`_expand`: per-head ``[batch, head, T, d]`` summed back to kv heads."""
    b, h, t, d = x.shape
    return x if h == n_kv else x.view(b, n_kv, h // n_kv, t, d).sum(2)


class TiledAttention(torch.autograd.Function):
    """``Z = softmax(mask(cap(Q K^T c))) V`` in query tiles; see the module docstring.

    ``apply(q, k, v, scale, softcap, mask, tile, observer)``: ``q`` ``[batch, head, T, d]``,
    ``k`` and ``v`` ``[batch, kv_head, T, d]``; ``mask`` a :data:`MaskTile`; ``observer``
    a :class:`TileObserver` or ``None``. Returns ``Z`` ``[batch, head, T, d]``.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, softcap: float | None, mask: MaskTile, tile: int, observer):  # type: ignore[override]
        n_heads, width = q.shape[1], q.shape[2]
        dtype = _softmax_dtype(q.dtype)
        keys, values = _expand(k, n_heads), _expand(v, n_heads)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=dtype, device=q.device)
        for start in range(0, width, tile):
            stop = min(width, start + tile)
            scores = _scores(q[:, :, start:stop], keys, scale, softcap)[0]
            scores = mask(scores, start, stop).to(dtype)
            row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            pattern = _nan_to_zero((scores - row_lse).exp()).to(v.dtype)
            out[:, :, start:stop] = pattern @ values
            lse[:, :, start:stop] = row_lse[..., 0]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.softcap, ctx.mask, ctx.tile, ctx.observer = scale, softcap, mask, tile, observer
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        n_heads, width = q.shape[1], q.shape[2]
        dtype = _softmax_dtype(q.dtype)
        model_keys = _expand(k, n_heads)  # the scores are recomputed in the model dtype, as the forward made them
        keys, values = model_keys.to(dtype), _expand(v, n_heads).to(dtype)
        grad_out = grad_out.contiguous()
        delta = (grad_out.to(dtype) * out.to(dtype)).sum(-1, keepdim=True)  # rowsum(dZ * Z) = rowsum(A * G)
        grad_q = torch.empty_like(q)
        grad_keys = torch.zeros(keys.shape, dtype=dtype, device=q.device)
        grad_values = torch.zeros_like(grad_keys)
        for start in range(0, width, ctx.tile):
            stop = min(width, start + ctx.tile)
            q_tile = q[:, :, start:stop]
            scores, capped = _scores(q_tile, model_keys, ctx.scale, ctx.softcap)
            scores = ctx.mask(scores, start, stop).to(dtype)
            pattern = _nan_to_zero((scores - lse[:, :, start:stop, None]).exp())
            d_out = grad_out[:, :, start:stop].to(dtype)
            grad_pattern = d_out @ values.transpose(-1, -2)
            if ctx.observer is not None:
                ctx.observer.add(start, pattern, grad_pattern, d_out, values)
            grad_scores = pattern * (grad_pattern - delta[:, :, start:stop])
            del grad_pattern
            if capped is not None:  # d/dx s tanh(x / s) = 1 - tanh^2
                grad_scores = grad_scores * (1 - capped.to(dtype).square())
            grad_scores = grad_scores * ctx.scale
            grad_q[:, :, start:stop] = (grad_scores @ keys).to(q.dtype)
            grad_keys += grad_scores.transpose(-1, -2) @ q_tile.to(dtype)
            grad_values += pattern.transpose(-1, -2) @ d_out
        if ctx.observer is not None:
            ctx.observer.finish()
        n_kv = k.shape[1]
        return grad_q, _fold(grad_keys, n_kv).to(k.dtype), _fold(grad_values, n_kv).to(v.dtype), None, None, None, None, None


def _scores(
    q_tile: Float[Tensor, "batch head row d"], keys: Float[Tensor, "batch head key d"], scale: float, softcap: float | None
) -> tuple[Tensor, Tensor | None]:
    """Scaled (and soft-capped) scores of one tile, and ``tanh(x / s)`` where soft-capped (for the backward)."""
    scores = (q_tile @ keys.transpose(-1, -2)) * scale
    if softcap is None:
        return scores, None
    capped = torch.tanh(scores / softcap)
    return capped * softcap, capped


def _nan_to_zero(x: Tensor) -> Tensor:
    """Rows with every key masked (``lse = -inf``) give NaN; the eager bridge zeroes them, so do we."""
    return torch.where(torch.isnan(x), torch.zeros((), dtype=x.dtype, device=x.device), x)


def tiled_attention(
    q: Float[Tensor, "batch head pos d"],
    k: Float[Tensor, "batch kv_head pos d"],
    v: Float[Tensor, "batch kv_head pos d"],
    scale: float,
    *,
    softcap: float | None = None,
    mask: MaskTile = causal_mask,
    tile: int = 64,
    observer: TileObserver | None = None,
) -> Float[Tensor, "batch head pos d"]:
    """``softmax(mask(cap(Q K^T c))) V`` without a ``[T, T]`` tensor (see :class:`TiledAttention`)."""
    return TiledAttention.apply(q, k, v, scale, softcap, mask, tile, observer)
