"""Attention patching: steer a model by adding averaged RA maps to its attention.

The paper's recipe (Katz & Wolf, NAACL 2025, section 6): average the RA maps of
training prompts of one token length (each prompt's own target loss, not a batch
average), then add ``lr * mean_RA`` to the post-softmax attention of every head, with
no renormalisation, while the model reads test prompts of that same length. RA is
the gradient of the loss with respect to the attention scores, so a negative ``lr``
is a descent step (the paper uses lr = -30 for RA and +1 for the forward-attention
baseline, untuned).

The patch is applied at ``hook_z``: a head's output is ``z = A @ V``, so adding
``delta`` to ``A`` adds ``delta @ V`` to ``z``. The values come from ``hook_v`` of the
same layer, which fires earlier in the same forward pass. This is exact, and works
on every architecture, including those where the bridge hands attention to the
Hugging Face module and discards edits to ``hook_pattern``
(``attention_patch_hooks(..., at="pattern")`` gives the plain pattern hook where it
is live).

:func:`iterative_patching` repeats the step: it recomputes RA with the current patch
applied and adds ``lr * RA`` again. Because the patch sits at ``hook_z``, the
observed ``hook_pattern`` stays the softmax output, so the recomputed RA is the exact
gradient with respect to the attention scores of the patched model.

Layout: the maps and the patch hooks live in :mod:`tl_reversed.experiments.patch_hooks`
(re-exported here); this module holds the evaluation: the learning-rate sweep
(:func:`evaluate_patching`), :func:`train_loss` and :func:`iterative_patching`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_reversed.core.architecture import Model, ModelSpec, describe
from tl_reversed.core.checks import finite_float, finite_floats, optional_batch_size, positive_int
from tl_reversed.core.options import SOURCES, Source, check_option, show_progress
from tl_reversed.core.results import Result
from tl_reversed.core.engine import Hook, model_device
from tl_reversed.core.inputs import Batch
from tl_reversed.experiments.evaluation import accuracy, last_logits, prompt_batch
from tl_reversed.experiments.patch_hooks import (
    GROUP_HINT,
    PATCH_POINTS,
    AttentionMaps,
    MeanMaps,
    length_counts,
    single_length,
    attention_patch,
    attention_patch_hooks,
    average_maps,
    mean_maps,
    patch_hooks,
)

__all__ = [
    "PAPER_LR",
    "PAPER_LRS",
    "PATCH_POINTS",
    "SOURCES",
    "AttentionMaps",
    "IterativePatching",
    "MeanMaps",
    "PatchingSweep",
    "attention_patch",
    "attention_patch_hooks",
    "average_maps",
    "best_lr",
    "evaluate_patching",
    "iterative_patching",
    "mean_maps",
    "patch_hooks",
    "train_loss",
]

PAPER_LRS = (3, 2, 1, 0.5, 0, -0.1, -0.5, -1, -2, -4, -6, -8, -10, -15, -20, -25, -30, -35, -40, -60, -80, -100, -120)
"""The paper's learning-rate sweep."""

PAPER_LR = {"ra": -30.0, "fa": 1.0}
"""The untuned learning rates the paper reports for each source."""


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def _test_batch(model: Model, test: object, length: int, spec: ModelSpec) -> Batch:
    batch = prompt_batch(model, test, spec)
    bad = (batch.lengths != length).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"the maps were averaged over prompts of {length} tokens, but {len(bad)} test prompts have another "
            f"length (test prompt {bad[0]} has {int(batch.lengths[bad[0]])} tokens; the test set has "
            f"{length_counts(batch)}): {GROUP_HINT}"
        )
    return batch


@dataclass
class PatchingSweep(Result):
    """Test accuracy for each learning rate of an attention patch.

    Attributes:
        source: ``"ra"`` or ``"fa"``.
        lrs: the learning rates.
        accuracy: test top-1 accuracy of the first target token at each lr.
        original: accuracy without any patch.
        length, n_train, n_test: prompt length and set sizes.
        seconds: wall time (maps and sweep).
    """

    source: str
    lrs: list[float]
    accuracy: list[float]
    original: float
    length: int
    n_train: int
    n_test: int
    seconds: float = 0.0
    maps: AttentionMaps | None = field(default=None, repr=False)

    def at(self, lr: float) -> float:
        """Accuracy at one of the swept learning rates."""
        if float(lr) not in self.lrs:
            raise ValueError(f"lr {lr} was not swept; the sweep has {self.lrs}")
        return self.accuracy[self.lrs.index(float(lr))]

    def best(self) -> tuple[float, float]:
        """``(lr, accuracy)`` of the best learning rate (see :func:`best_lr`)."""
        return best_lr(self.lrs, self.accuracy)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per learning rate."""
        return pd.DataFrame({"source": self.source, "lr": self.lrs, "accuracy": self.accuracy})

    def plot(self, ax=None, **kwargs):
        """Accuracy against lr (symmetric-log axis); returns the matplotlib Figure."""
        from tl_reversed.views.plotting import figure_and_axes

        fig, ax = figure_and_axes(ax, (5, 3.5))
        ax.plot(self.lrs, self.accuracy, marker="o", label=f"{self.source.upper()} patch", **kwargs)
        ax.axhline(self.original, color="grey", linestyle=":", label="no patch")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("lr")
        ax.set_ylabel("top-1 accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize="small")
        return fig


def best_lr(lrs: Sequence[float], accuracy: Sequence[float]) -> tuple[float, float]:
    """``(lr, accuracy)`` of the best learning rate of a sweep (on ties, the one closest to 0, then the first)."""
    i = max(range(len(lrs)), key=lambda j: (accuracy[j], -abs(lrs[j]), -j))
    return lrs[i], accuracy[i]


def evaluate_patching(
    model: Model,
    train: object,
    test: object,
    source: Source = "ra",
    lrs: Sequence[float] = PAPER_LRS,
    *,
    maps: AttentionMaps | None = None,
    batch_size: int | None = 16,
    progress: bool | None = None,
) -> PatchingSweep:
    """Test accuracy with the averaged ``source`` maps of ``train`` patched in at each lr.

    Args:
        model: a TransformerBridge (compatibility mode) or HookedTransformer.
        train: training examples of one token length (see :func:`average_maps`).
        test: test examples of the same length.
        source: ``"ra"`` or ``"fa"``.
        lrs: learning rates to try (default: the paper's sweep, :data:`PAPER_LRS`).
        maps: precomputed :func:`average_maps` of ``train`` (skips recomputing them).
        batch_size: prompts per forward pass.
        progress: show a progress bar over the sweep (``None``: when there is more than one
            lr; see :mod:`tl_reversed.core.options`).
    """
    check_option("source", source, SOURCES)
    values = finite_floats(lrs, "lrs")
    optional_batch_size(batch_size)
    start = time.perf_counter()
    spec, device = describe(model), model_device(model)
    if maps is None:
        maps = mean_maps(model, spec, prompt_batch(model, train, spec), source, batch_size, progress)
    elif maps.source != source:
        raise ValueError(f"maps were made from {maps.source!r} but source={source!r}")
    batch = _test_batch(model, test, maps.length, spec)
    original = accuracy(model, batch, batch_size=batch_size)
    results = []
    for lr in tqdm(values, desc=f"{source.upper()} lr sweep", disable=not show_progress(progress, len(values)), leave=False):
        # one forward-only engine pass per lr (each leaves the model untouched)
        hooks = patch_hooks(spec, device, maps, lr) if lr != 0 else []
        results.append(original if lr == 0 else accuracy(model, batch, hooks, batch_size=batch_size))
    return PatchingSweep(
        source=source,
        lrs=values,
        accuracy=results,
        original=original,
        length=maps.length,
        n_train=maps.n_examples,
        n_test=len(batch),
        seconds=time.perf_counter() - start,
        maps=maps,
    )


def train_loss(model: Model, examples: object, hooks: Sequence[Hook] = (), *, batch_size: int | None = 16) -> float:
    """Mean cross-entropy of the first target token at the last prompt token, with ``hooks`` on."""
    return _train_loss(model, prompt_batch(model, examples), hooks, batch_size)


def _train_loss(model: Model, batch: Batch, hooks: Sequence[Hook], batch_size: int | None) -> float:
    logprobs = last_logits(model, batch, hooks, batch_size=batch_size).log_softmax(-1)
    return float(-logprobs.gather(-1, batch.target[:, None]).mean())


@dataclass
class IterativePatching(Result):
    """Accuracy after each step of iterative RA patching.

    Attributes:
        lr: the learning rate of every step.
        accuracy: test accuracy after step ``0`` (no patch), ``1``, ..., ``steps``.
        train_loss: mean training loss under the patch of step ``0``, ``1``, ...
            (``train_loss[s]`` is the loss RA was computed with at step ``s + 1``;
            the last entry is the loss under the final patch).
        patch: the final patch ``[layer, head, query_pos, key_pos]`` (apply it with
            ``attention_patch(model, result.patch, lr=1)``).
        length, n_train, n_test: prompt length and set sizes.
        seconds: wall time.
        chosen_step: the step whose patch :attr:`patch` is (``steps`` for a fixed count;
            with ``steps="auto"``, the step of lowest training loss, chosen on the
            training prompts alone).
    """

    lr: float
    accuracy: list[float]
    train_loss: list[float]
    patch: Float[Tensor, "layer head query_pos key_pos"]
    length: int
    n_train: int
    n_test: int
    seconds: float = 0.0
    chosen_step: int | None = None

    @property
    def steps(self) -> list[int]:
        return list(range(len(self.accuracy)))

    def to_dataframe(self) -> pd.DataFrame:
        """One row per step: step, test accuracy, training loss."""
        return pd.DataFrame({"step": self.steps, "lr": self.lr, "accuracy": self.accuracy, "train_loss": self.train_loss})

    def plot(self, ax=None, **kwargs):
        """Test accuracy after each step; returns the matplotlib Figure."""
        from tl_reversed.views.plotting import figure_and_axes

        fig, ax = figure_and_axes(ax, (5, 3.5))
        ax.plot(self.steps, self.accuracy, marker="o", label=f"iterative RA, lr {self.lr:g}", **kwargs)
        ax.set_xlabel("step")
        ax.set_ylabel("top-1 accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize="small")
        return fig


def iterative_patching(
    model: Model,
    train: object,
    test: object,
    lr: float = -10.0,
    steps: int | str = 5,
    *,
    max_steps: int = 10,
    tol: float = 1e-3,
    threshold: float = 0.0,
    batch_size: int | None = 16,
    progress: bool | None = None,
) -> IterativePatching:
    """Repeat RA patching: recompute RA under the current patch, add ``lr * RA``, ``steps`` times.

    Step 1 is exactly one-shot patching (``evaluate_patching(..., lrs=[lr])``). Each
    later step computes the training prompts' RA with the accumulated patch applied
    (at ``hook_z``, so RA stays the exact gradient of the patched model) and adds
    ``lr * RA`` to it. Test accuracy is measured after every step. ``progress``: a bar
    over the steps (``None``: when there is more than one; see :mod:`tl_reversed.core.options`).

    ``steps="auto"``: stop on the training prompts alone, never the test set: after at
    most ``max_steps`` steps, or as soon as the training loss reaches ``threshold`` or
    falls by less than ``tol`` (relative) below the best loss so far; the result's patch
    is the one of lowest training loss (``chosen_step``).
    """
    auto = steps == "auto"
    steps = positive_int(max_steps if auto else steps, "max_steps" if auto else "steps")  # type: ignore[arg-type]
    lr, tol, threshold = finite_float(lr, "lr"), finite_float(tol, "tol"), finite_float(threshold, "threshold")
    optional_batch_size(batch_size)
    start = time.perf_counter()
    spec, device = describe(model), model_device(model)
    train_batch = prompt_batch(model, train, spec)
    length = single_length(train_batch, "iterative_patching: the training prompts")
    batch = _test_batch(model, test, length, spec)
    patch = torch.zeros(spec.n_layers, spec.n_heads, length, length)
    accuracies, losses, patches = [accuracy(model, batch, batch_size=batch_size)], [], [patch]
    stopped = False
    for step in tqdm(range(steps), desc=f"iterative RA, lr {lr:g}", disable=not show_progress(progress, steps), leave=False):
        current = patch_hooks(spec, device, patch, 1.0) if bool(patch.any()) else []
        maps = mean_maps(model, spec, train_batch, "ra", batch_size, False, current)
        losses.append(maps.loss)
        if auto and step > 0 and plateau(losses, tol, threshold):
            stopped = True
            break
        patch = patch + float(lr) * maps.maps
        patches.append(patch)
        accuracies.append(accuracy(model, batch, patch_hooks(spec, device, patch, 1.0), batch_size=batch_size))
    if not stopped:
        losses.append(_train_loss(model, train_batch, patch_hooks(spec, device, patch, 1.0), batch_size))
    chosen = min(range(len(losses)), key=lambda s: (losses[s], s)) if auto else steps
    return IterativePatching(
        lr=float(lr),
        accuracy=accuracies,
        train_loss=losses,
        patch=patches[chosen],
        length=length,
        n_train=maps.n_examples,
        n_test=len(batch),
        seconds=time.perf_counter() - start,
        chosen_step=chosen,
    )


def plateau(losses: Sequence[float], tol: float, threshold: float) -> bool:
    """Whether the last training loss reached ``threshold`` or improved on the best before it by less than ``tol`` (relative)."""
    best = min(losses[:-1])
    return losses[-1] <= threshold or losses[-1] > best - tol * abs(best)
