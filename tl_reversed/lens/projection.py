"""Reading vectors of the residual stream in the vocabulary: :class:`Projector`, and the
scatter of its per-row results into a :class:`~tl_reversed.lens.results.TopTokens`.

The projections (``"weight"``, ``"jacobian"``) and their sign are defined in
:mod:`tl_reversed.lens.backward_lens`.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_reversed.core.checks import as_int
from tl_reversed.core.architecture import NormAffine, final_norm, unembed_weight
from tl_reversed.lens.results import TopTokens

ROWS_PER_CHUNK = 1 << 24  # vocabulary logits computed at once (floats), bounds the memory


def check_top_k(top_k: int, d_vocab: int) -> int:
    """``top_k`` if it is an integer from 1 to ``d_vocab``; a ValueError saying so otherwise."""
    top_k = as_int(top_k, "top_k")
    if not 1 <= top_k <= d_vocab:
        raise ValueError(f"top_k must be an integer from 1 to the vocabulary size {d_vocab}, got {top_k!r}")
    return top_k


class Projector:
    """Reads vectors of the residual stream in the vocabulary (see :mod:`tl_reversed.lens.backward_lens`)."""

    def __init__(self, model: torch.nn.Module, projection: str, top_k: int, dtype: torch.dtype):
        self.norm: NormAffine = final_norm(model)
        self.w_u = unembed_weight(model).to(dtype)  # on the unembedding's device (the last one of a split model)
        self.gain = self.norm.gain.to(self.w_u.device, dtype)
        self.jacobian = projection == "jacobian"
        self.top_k = check_top_k(top_k, self.w_u.shape[1])
        self.d_model = self.gain.shape[0]

    def logits(
        self,
        v: Float[Tensor, "rows d_model"],
        xhat: Float[Tensor, "rows d_model"] | None,
        scale: Float[Tensor, " rows"] | None,
    ) -> Float[Tensor, "rows d_vocab"]:
        """``lens(v)`` for each row (the logit change per unit step along ``+v``)."""
        c = v - v.mean(-1, keepdim=True) if self.norm.centered else v
        if self.jacobian:
            assert xhat is not None and scale is not None
            c = (c - xhat * (xhat * c).sum(-1, keepdim=True) / self.d_model) / scale[:, None]
        return (c * self.gain) @ self.w_u

    def top(
        self,
        v: Float[Tensor, "rows d_model"],
        xhat: Tensor | None,
        scale: Tensor | None,
        target: Int[Tensor, " rows"] | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """Top tokens toward (of ``-v``) and away (of ``+v``), and the target's rank, per row."""
        if v.shape[0] == 0:  # every VJP was zero (a metric times 0, a zeroed o_proj): nothing to read
            ids = torch.empty(0, self.top_k, dtype=torch.long)
            values = torch.empty(0, self.top_k, dtype=v.dtype)
            return ids, values, ids, values, None if target is None else torch.empty(0, dtype=torch.long)
        outs: list[list[Tensor]] = [[], [], [], [], []]
        step = max(1, ROWS_PER_CHUNK // self.w_u.shape[1])
        for a in range(0, v.shape[0], step):
            sl = slice(a, a + step)
            logits = self.logits(v[sl], None if xhat is None else xhat[sl], None if scale is None else scale[sl])
            toward = (-logits).topk(self.top_k, dim=-1)
            away = logits.topk(self.top_k, dim=-1)
            outs[0].append(toward.indices.cpu())
            outs[1].append(toward.values.cpu())
            outs[2].append(away.indices.cpu())
            outs[3].append(away.values.cpu())
            if target is not None:
                own = logits.gather(-1, target[sl, None])
                outs[4].append(((logits < own).sum(-1) + 1).cpu())
        joined = [torch.cat(o) if o else None for o in outs]
        return joined[0], joined[1], joined[2], joined[3], joined[4]  # type: ignore[return-value]


def store_rows(top: TopTokens, index: tuple, real: Tensor, parts: tuple) -> None:
    """Scatter per-row results (rows = the True entries of ``real``) into ``top[index]``."""
    # Indexing with a tensor of rows would write into a copy: write through one view per row.
    idx, *rest = index
    toward_ids, toward_values, away_ids, away_values, rank = parts
    offset = 0
    for b, i in enumerate(idx.tolist()):
        mask = real[b]
        count = int(mask.sum())
        sl = slice(offset, offset + count)
        view_index = (i, *rest)
        for name, value in (("toward_ids", toward_ids), ("toward_values", toward_values),
                            ("away_ids", away_ids), ("away_values", away_values)):  # fmt: skip
            target = getattr(top, name)[view_index]
            target[mask] = value[sl].to(target.dtype)
        if rank is not None and top.target_rank is not None:
            top.target_rank[view_index][mask] = rank[sl]
        offset += count
