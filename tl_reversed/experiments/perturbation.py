"""The perturbation test: how well does a head ranking find the heads a task needs?

Start with every head masked (its ``hook_z`` zeroed at every position), then keep the
top ``round(fraction * n_heads_total)`` heads of a ranking for each fraction
``0, 0.1, ..., 1``, and measure the top-1 accuracy of the first target token at each
step. The score is the area under that curve (trapezoid rule). A good ranking has a
high AUC in its own order and a low AUC reversed (least important heads first).

Masking is done with hooks only: one forward hook per layer on ``hook_z`` multiplies
the ``[head]`` axis by a 0/1 mask. No weights are edited and the model is never
reloaded; every forward runs under ``torch.no_grad``, batched with right padding.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_reversed.core.architecture import Model, ModelSpec, attn_hook, describe
from tl_reversed.core.checks import finite_scores, optional_batch_size
from tl_reversed.core.engine import Hook
from tl_reversed.core.inputs import Batch
from tl_reversed.core.options import show_progress
from tl_reversed.core.results import Result
from tl_reversed.experiments.evaluation import correct, last_logits, prompt_batch

FRACTIONS = tuple(round(0.1 * i, 10) for i in range(11))
"""The paper's steps: keep 0 %, 10 %, ..., 100 % of the heads."""


def auc(fractions: Sequence[float], accuracy: Sequence[float]) -> float:
    """Trapezoid area under ``accuracy(fraction)``, divided by the fraction span.

    The one AUC of the package: :attr:`PerturbationResult.auc`, the CLI's tables and
    the labels of :func:`tl_reversed.views.plotting.plot_perturbation` all use it. Points
    are taken in order of fraction. For the default fractions 0..1 this is the plain
    area; a constant curve has the constant as its AUC whatever the fractions.
    """
    x, y = np.asarray(fractions, dtype=float), np.asarray(accuracy, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need one accuracy per fraction, got {x.size} fractions and {y.size} accuracies")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if x.size < 2:
        raise ValueError(f"an AUC needs at least two fractions, got {list(fractions)}")
    span = x[-1] - x[0]
    if span <= 0:
        raise ValueError(f"fractions must span an interval, got {list(fractions)}")
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / span)


@dataclass
class PerturbationResult(Result):
    """Accuracy as the top heads of a ranking are kept, and its AUC.

    Attributes:
        fractions: share of heads kept at each step.
        n_kept: number of heads kept at each step.
        accuracy: top-1 accuracy of the first target token at each step.
        method: the ranking's method (``"custom"`` for a plain tensor).
        reverse: whether the ranking was used least-important first.
        n_examples: number of examples evaluated.
        seconds: wall time.
    """

    fractions: list[float]
    n_kept: list[int]
    accuracy: list[float]
    method: str
    reverse: bool
    n_examples: int
    seconds: float = 0.0

    @property
    def auc(self) -> float:
        """Trapezoid area under the accuracy curve (see :func:`auc`)."""
        return auc(self.fractions, self.accuracy)

    @property
    def label(self) -> str:
        return f"{self.method} (reversed)" if self.reverse else self.method

    def to_dataframe(self) -> pd.DataFrame:
        """One row per step: method, reverse, fraction, n_kept, accuracy."""
        return pd.DataFrame(
            {
                "method": self.method,
                "reverse": self.reverse,
                "fraction": self.fractions,
                "n_kept": self.n_kept,
                "accuracy": self.accuracy,
            }
        )

    def plot(self, ax=None, **kwargs):
        """Accuracy against the share of heads kept; returns the matplotlib Figure."""
        from tl_reversed.views.plotting import figure_and_axes

        fig, ax = figure_and_axes(ax, (5, 3.5))
        kwargs.setdefault("linestyle", "--" if self.reverse else "-")
        ax.plot(self.fractions, self.accuracy, marker="o", label=f"{self.label}: AUC {self.auc:.3f}", **kwargs)
        ax.set_xlabel("share of heads kept")
        ax.set_ylabel("top-1 accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize="small")
        return fig


def head_order(scores: object, spec: ModelSpec, reverse: bool) -> tuple[list[tuple[int, int]], str]:
    """The ranking as ``(layer, head)`` pairs, most important first, and its name."""
    if isinstance(getattr(scores, "scores", None), Tensor):
        finite_scores(scores.scores, f"the {getattr(scores, 'method', 'custom')} head scores")  # type: ignore[attr-defined]
    if hasattr(scores, "order"):
        order, method = scores.order(reverse=reverse), str(getattr(scores, "method", "custom"))  # type: ignore[attr-defined]
    elif isinstance(scores, Tensor):
        if scores.shape != (spec.n_layers, spec.n_heads):
            raise ValueError(
                f"scores must have shape [layer, head] = ({spec.n_layers}, {spec.n_heads}), got {tuple(scores.shape)}"
            )
        from tl_reversed.experiments.ranking import HeadScores

        finite_scores(scores, "scores")
        order, method = HeadScores(scores.detach().cpu(), "custom").order(reverse=reverse), "custom"
    else:
        order, method = [tuple(map(int, pair)) for pair in scores], "custom"  # type: ignore[attr-defined]
        if reverse:
            order = order[::-1]
    expected = {(layer, head) for layer in range(spec.n_layers) for head in range(spec.n_heads)}
    if len(order) != len(expected) or set(order) != expected:
        raise ValueError(
            f"a ranking must list each of the model's {len(expected)} heads exactly once; got {len(order)} entries"
        )
    return order, method


def head_mask(kept: Sequence[tuple[int, int]], spec: ModelSpec) -> Float[Tensor, "layer head"]:
    """1 for the kept heads, 0 for the masked ones."""
    mask = torch.zeros(spec.n_layers, spec.n_heads)
    for layer, head in kept:
        mask[layer, head] = 1.0
    return mask


def mask_hooks(mask: Float[Tensor, "layer head"]) -> list[Hook]:
    """One ``hook_z`` hook per layer with a masked head, multiplying ``z`` by the ``[head]`` mask."""
    hooks = []
    for layer in range(mask.shape[0]):
        if bool((mask[layer] != 1).any()):
            hooks.append((attn_hook(layer, "z"), _scale_heads(mask[layer])))
    return hooks


def _scale_heads(head_mask: Float[Tensor, " head"]):
    def hook(z: Float[Tensor, "batch pos head d_head"], hook: object) -> Tensor:
        return z * head_mask.to(device=z.device, dtype=z.dtype)[None, None, :, None]

    return hook


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    values = [float(f) for f in fractions]
    if len(values) < 2:
        raise ValueError(f"give at least two fractions (e.g. the default {FRACTIONS}), got {values}")
    if any(not 0.0 <= f <= 1.0 for f in values):
        raise ValueError(f"fractions must lie in [0, 1], got {values}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"fractions must be strictly increasing, got {values}")
    return values


def perturbation_test(
    model: Model,
    examples: object,
    scores: object,
    fractions: Sequence[float] = FRACTIONS,
    *,
    reverse: bool = False,
    batch_size: int | None = 16,
    progress: bool | None = None,
    cache: dict | None = None,
) -> PerturbationResult:
    """Keep the top heads of a ranking, mask the rest, and measure accuracy.

    Args:
        model: a TransformerBridge (compatibility mode) or HookedTransformer.
        examples: an ``ExampleSet``, a list of ``Example`` or ``(prompts, targets)``;
            targets are scored by their first token, read at each prompt's last token.
        scores: a :class:`tl_reversed.experiments.ranking.HeadScores`, a ``[layer, head]`` tensor
            (higher = more important) or a list of every ``(layer, head)``, most important first.
        fractions: shares of heads to keep, increasing; ``round(fraction * n_heads_total)``
            heads are kept at each step.
        reverse: use the ranking least-important first.
        batch_size: examples per forward pass (``None``: all at once).
        progress: show a progress bar over the steps (``None``: when there is more than
            one; see :mod:`tl_reversed.core.options`).
        cache: a dict shared by several calls with the same model and examples: forwards
            with an identical head mask (e.g. keep-none and keep-all, common to every
            ranking) are then run once.

    Returns:
        A :class:`PerturbationResult` with the curve and its AUC.
    """
    spec = describe(model)
    values = _check_fractions(fractions)
    optional_batch_size(batch_size)
    order, method = head_order(scores, spec, reverse)
    total = spec.n_layers * spec.n_heads
    start = time.perf_counter()
    batch = prompt_batch(model, examples, spec)
    key_base = (tuple(batch.prompts or ()), tuple(batch.target_strings or ()))
    n_kept, accuracy = [], []
    steps = tqdm(values, desc=f"perturbation {method}{' reversed' if reverse else ''}", disable=not show_progress(progress, len(values)), leave=False)
    for fraction in steps:  # one forward-only engine pass per step (each leaves the model untouched)
        k = int(round(fraction * total))
        mask = head_mask(order[:k], spec)
        hits = _correct_under_mask(model, batch, mask, batch_size, cache, key_base)
        n_kept.append(k)
        accuracy.append(float(hits.double().mean()))
    return PerturbationResult(
        fractions=values,
        n_kept=n_kept,
        accuracy=accuracy,
        method=method,
        reverse=reverse,
        n_examples=len(batch),
        seconds=time.perf_counter() - start,
    )


def _correct_under_mask(model: Model, batch: Batch, mask: Tensor, batch_size, cache: dict | None, key_base) -> Tensor:
    key = (key_base, tuple(mask.flatten().tolist()))
    if cache is not None and key in cache:
        return cache[key]
    hits = correct(last_logits(model, batch, mask_hooks(mask), batch_size=batch_size), batch)
    if cache is not None:
        cache[key] = hits
    return hits
