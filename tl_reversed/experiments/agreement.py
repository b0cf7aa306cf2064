"""Agreement of head rankings with a reference ranking (causal mediation, CM1, by default).

The protocol of attribution-patching studies (e.g. AtP*, Kramar et al. 2024): for each
ranking method, the Spearman correlation of its head scores with the reference's, and
Recall@K, the share of the reference's top-K heads that are also in the method's top K.

Ties:

* Spearman uses *average ranks* (tied scores share the mean of the ranks they span), then
  the Pearson correlation of the ranks: the usual tie-corrected Spearman. A ranking with
  every score equal has no order, and its correlation is NaN.
* Recall@K takes each top K in :meth:`HeadScores.order` order: ties at the K-th place
  are broken by layer, then head (earlier first), for the method and the reference alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_reversed.core.results import Result

__all__ = ["Agreement", "agreement", "average_ranks", "recall_at_k", "resolve_k", "spearman"]

K = int | str
"""A K of Recall@K: a number of heads (``10``) or a share of all heads (``"10%"``)."""


def average_ranks(values: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks 1..n of ``values`` (ascending), tied values sharing their average rank."""
    flat = values.double().flatten()
    order = torch.argsort(flat, stable=True)
    ranks = torch.empty_like(flat)
    ranks[order] = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    unique, inverse = torch.unique(flat, return_inverse=True)
    total = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    count = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (total / count)[inverse]


def spearman(a: Float[Tensor, "..."], b: Float[Tensor, "..."]) -> float:
    """Spearman correlation of two score tensors of one shape (average ranks for ties; NaN if one is constant)."""
    if a.shape != b.shape:
        raise ValueError(f"scores to correlate must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else math.nan


def resolve_k(k: K, n: int) -> int:
    """A K as a number of heads: ``10`` -> 10, ``"10%"`` of ``n`` heads -> ``round(n / 10)`` (at least 1)."""
    if isinstance(k, str) and k.endswith("%"):
        try:
            share = float(k[:-1])
        except ValueError:
            share = -1.0
        if not 0 < share <= 100:
            raise ValueError(f"a K given as a share must be between 0% and 100%, like '10%'; got {k!r}")
        return max(1, round(n * share / 100))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"K must be a number of heads from 1 to {n} or a share like '10%'; got {k!r}")
    return k


def _top(scores: Float[Tensor, "layer head"], k: int) -> set[int]:
    """The flat indices of the ``k`` highest scores, ties broken by layer then head (as HeadScores.order)."""
    return set(torch.argsort(scores.flatten().float(), descending=True, stable=True)[:k].tolist())


def recall_at_k(scores: Float[Tensor, "layer head"], reference: Float[Tensor, "layer head"], k: int) -> float:
    """Share of the reference's top ``k`` heads that are in the top ``k`` of ``scores``."""
    return len(_top(scores, k) & _top(reference, k)) / k


@dataclass
class Agreement(Result):
    """How well each ranking method agrees with a reference ranking.

    Attributes:
        methods: the methods compared, in the order given.
        reference: the reference's method name (e.g. ``"cm1"``).
        spearman: ``[method]`` Spearman correlation of each method's scores with the reference's.
        recall: ``[method, k]`` Recall@K of the reference's top-K heads.
        ks: each K as a number of heads.
        k_labels: each K as given (``"10"``, ``"10%"``).
    """

    methods: list[str]
    reference: str
    spearman: Float[Tensor, " method"]
    recall: Float[Tensor, "method k"]
    ks: list[int]
    k_labels: list[str]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per method: ``method``, ``reference``, ``spearman``, ``recall@K`` for each K."""
        rows = []
        for i, method in enumerate(self.methods):
            row = {"method": method, "reference": self.reference, "spearman": float(self.spearman[i])}
            row |= {f"recall@{label}": float(self.recall[i, j]) for j, label in enumerate(self.k_labels)}
            rows.append(row)
        return pd.DataFrame(rows)


def _tensor(scores: object) -> Tensor:
    tensor = getattr(scores, "scores", scores)
    if not isinstance(tensor, Tensor) or tensor.ndim != 2:
        raise TypeError(f"expected HeadScores or a [layer, head] tensor, got {type(scores).__name__}")
    return tensor.detach().float().cpu()


def agreement(scores: object, reference: object, ks: Sequence[K] = (10, "10%")) -> Agreement:
    """Spearman correlation and Recall@K of one or several rankings against a reference.

    Args:
        scores: a :class:`~tl_reversed.experiments.ranking.HeadScores` (or ``[layer, head]``
            tensor), or a dict ``{name: HeadScores}`` to compare several methods at once.
        reference: the reference :class:`HeadScores` (e.g. ``head_scores(model, ex, "cm1")``).
        ks: the K of Recall@K: numbers of heads and shares of all heads (``"10%"``).

    Returns:
        An :class:`Agreement`; ``to_dataframe()`` gives one row per method.
    """
    ref = _tensor(reference)
    named = dict(scores) if isinstance(scores, Mapping) else {getattr(scores, "method", "scores"): scores}
    if not named:
        raise ValueError("no rankings to compare: give a HeadScores or a non-empty dict of them")
    tensors = {name: _tensor(s) for name, s in named.items()}
    for name, tensor in tensors.items():
        if tensor.shape != ref.shape:
            raise ValueError(
                f"{name!r} scores {tuple(tensor.shape)} heads but the reference scores {tuple(ref.shape)}: "
                "compare rankings of one model"
            )
    resolved = [resolve_k(k, ref.numel()) for k in ks]
    return Agreement(
        methods=list(tensors),
        reference=str(getattr(reference, "method", "reference")),
        spearman=torch.tensor([spearman(t, ref) for t in tensors.values()], dtype=torch.float64),
        recall=torch.tensor([[recall_at_k(t, ref, k) for k in resolved] for t in tensors.values()], dtype=torch.float64),
        ks=resolved,
        k_labels=[str(k) for k in ks],
    )
