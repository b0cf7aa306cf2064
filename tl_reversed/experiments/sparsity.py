"""How sparse a map is: the paper's first claim (RA maps are sparser than forward attention).

Two measures per map, over its *causal entries* alone (query ``q`` and key ``k <= q``,
both real tokens; entries above the diagonal and on padding are ignored):

* :func:`top_mass_share`: the share of the map's absolute mass in its top ``frac`` (5%)
  of causal entries, ``k = ceil(frac * n)`` of the ``n`` entries (at least one);
* :func:`hoyer`: Hoyer's sparsity index of the absolute values,
  ``(sqrt(n) - L1 / L2) / (sqrt(n) - 1)``: 1 for a map with one non-zero entry, 0 for a
  map whose entries are all equal.

A map that is zero on every causal entry has neither (NaN). :func:`sparsity` measures RA
and forward attention of every (example, layer, head) of a
:class:`~tl_reversed.core.reversed_attention.ReversedAttention` kept with ``keep="maps"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_reversed.core.results import Result

__all__ = ["Sparsity", "causal_mask", "hoyer", "sparsity", "top_mass_share"]


def causal_mask(lengths: Int[Tensor, " batch"], width: int) -> Bool[Tensor, "batch query_pos key_pos"]:
    """True on the causal entries of each row: key <= query < length."""
    pos = torch.arange(width)
    real = pos[None, :] < lengths[:, None]
    lower = pos[None, :, None] >= pos[None, None, :]
    return real[:, :, None] & real[:, None, :] & lower


def _checked(maps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    if maps.shape[-2:] != mask.shape[-2:] or maps.shape[0] != mask.shape[0]:
        raise ValueError(f"maps {tuple(maps.shape)} and mask {tuple(mask.shape)} must share batch, query and key axes")
    shape = (mask.shape[0],) + (1,) * (maps.ndim - 3) + mask.shape[-2:]
    return maps.abs().double(), mask.reshape(shape).expand_as(maps)


def top_mass_share(
    maps: Float[Tensor, "batch *heads query_pos key_pos"], mask: Bool[Tensor, "batch query_pos key_pos"], frac: float = 0.05
) -> Float[Tensor, "batch *heads"]:
    """Share of each map's absolute mass in its top ``frac`` of causal entries (``ceil(frac * n)``, at least 1)."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be a share in (0, 1], like 0.05 for the top 5%; got {frac!r}")
    values, full = _checked(maps, mask)
    values = values.masked_fill(~full, 0.0).flatten(-2)
    n = full.flatten(-2).sum(-1)
    k = torch.clamp(torch.ceil(n.double() * frac), min=1).long()
    ranked = values.sort(-1, descending=True).values
    keep = torch.arange(ranked.shape[-1]) < k[..., None]
    total = values.sum(-1)
    return torch.where(total > 0, (ranked * keep).sum(-1) / total, math.nan)


def hoyer(
    maps: Float[Tensor, "batch *heads query_pos key_pos"], mask: Bool[Tensor, "batch query_pos key_pos"]
) -> Float[Tensor, "batch *heads"]:
    """Hoyer sparsity ``(sqrt(n) - L1/L2) / (sqrt(n) - 1)`` of each map's ``n`` causal entries."""
    values, full = _checked(maps, mask)
    values = values.masked_fill(~full, 0.0).flatten(-2)
    root_n = full.flatten(-2).sum(-1).double().sqrt()
    l1, l2 = values.sum(-1), values.norm(dim=-1)
    index = (root_n - l1 / l2) / (root_n - 1)
    return torch.where((l2 > 0) & (root_n > 1), index, math.nan)


@dataclass
class Sparsity(Result):
    """Sparsity of RA and forward attention per (example, layer, head).

    Attributes:
        ra_top, fa_top: ``[example, layer, head]`` share of absolute mass in the top ``frac`` of causal entries.
        ra_hoyer, fa_hoyer: ``[example, layer, head]`` Hoyer sparsity index.
        layers: the model layers along the ``layer`` axis.
        frac: the top share (0.05: top 5%).
    """

    ra_top: Float[Tensor, "example layer head"]
    fa_top: Float[Tensor, "example layer head"]
    ra_hoyer: Float[Tensor, "example layer head"]
    fa_hoyer: Float[Tensor, "example layer head"]
    layers: list[int]
    frac: float = 0.05

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (example, layer, head) with the four measures."""
        n, n_layers, n_heads = self.ra_top.shape
        index = torch.cartesian_prod(torch.arange(n), torch.arange(n_layers), torch.arange(n_heads))
        return pd.DataFrame(
            {
                "example": index[:, 0].numpy(),
                "layer": [self.layers[i] for i in index[:, 1].tolist()],
                "head": index[:, 2].numpy(),
                "ra_top_mass": self.ra_top.flatten().numpy(),
                "fa_top_mass": self.fa_top.flatten().numpy(),
                "ra_hoyer": self.ra_hoyer.flatten().numpy(),
                "fa_hoyer": self.fa_hoyer.flatten().numpy(),
            }
        )

    def summary(self) -> pd.DataFrame:
        """Per measure: in how many (prompt, head) pairs, and in how many heads (mean over prompts), RA is sparser.

        Columns: ``measure``, ``ra_sparser_pairs``, ``pairs`` (pairs where both measures are
        defined), ``ra_sparser_heads``, ``heads``, and the mean of each measure for RA and FA.
        """
        rows = []
        for measure, ra, fa in (("top_mass", self.ra_top, self.fa_top), ("hoyer", self.ra_hoyer, self.fa_hoyer)):
            defined = ~(ra.isnan() | fa.isnan())
            ra_mean, fa_mean = ra.nanmean(0), fa.nanmean(0)
            heads = ~(ra_mean.isnan() | fa_mean.isnan())
            rows.append(
                {
                    "measure": measure,
                    "ra_sparser_pairs": int((ra > fa)[defined].sum()),
                    "pairs": int(defined.sum()),
                    "ra_sparser_heads": int((ra_mean > fa_mean)[heads].sum()),
                    "heads": int(heads.sum()),
                    "ra_mean": float(ra[defined].mean()) if defined.any() else math.nan,
                    "fa_mean": float(fa[defined].mean()) if defined.any() else math.nan,
                }
            )
        return pd.DataFrame(rows)


def sparsity(result: object, frac: float = 0.05) -> Sparsity:
    """Top-``frac`` mass share and Hoyer index of every RA and forward-attention map of ``result``.

    ``result`` is a :class:`~tl_reversed.core.reversed_attention.ReversedAttention` made with
    ``keep="maps"`` (the default of :func:`tl_reversed.reversed_attention`).
    """
    maps, pattern = getattr(result, "maps", None), getattr(result, "pattern", None)
    if maps is None or pattern is None:
        raise ValueError("sparsity needs the maps: call reversed_attention(..., keep='maps'), not keep='norms'")
    mask = causal_mask(result.lengths, maps.shape[-1])  # type: ignore[attr-defined]
    return Sparsity(
        ra_top=top_mass_share(maps, mask, frac).float(),
        fa_top=top_mass_share(pattern, mask, frac).float(),
        ra_hoyer=hoyer(maps, mask).float(),
        fa_hoyer=hoyer(pattern, mask).float(),
        layers=list(result.layers),  # type: ignore[attr-defined]
        frac=frac,
    )
