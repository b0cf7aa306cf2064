"""Iterative structured patching: repeat the RA step on the template structure, for prompts of any length.

:func:`~tl_reversed.experiments.attention_patching.iterative_patching` repeats the
paper's RA step (recompute RA under the current patch, add ``lr * RA``) on a patch over
absolute positions, so it trains and tests on prompts of one token length. This is the
same loop on a :class:`~tl_reversed.experiments.structured_patch.StructuredPatch`: each
step averages the training prompts' RA, computed with the current structured patch in
place (:func:`~tl_reversed.experiments.structured_patch.structured_maps` with ``under=``),
on their template cells, and adds ``lr`` times it. Training prompts may have any
lengths, and every step is tested on all test prompts of every length.

The stopping rule is the one of ``iterative_patching(steps="auto")``: it reads the
training loss alone, never the test set.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import pandas as pd
from tqdm.auto import tqdm

from tl_reversed.core.checks import finite_float, optional_batch_size, positive_int
from tl_reversed.core.options import show_progress
from tl_reversed.core.results import Result
from tl_reversed.experiments.attention_patching import plateau
from tl_reversed.experiments.structured_patch import StructuredPatch, structured_accuracy, structured_maps

__all__ = ["IterativeStructured", "iterative_structured"]


@dataclass
class IterativeStructured(Result):
    """Accuracy on test prompts of every length after each step of iterative structured patching.

    Attributes:
        lr: the learning rate of every step.
        accuracy: test accuracy after step ``0`` (no patch), ``1``, ...
        train_loss: mean training loss under the patch of step ``0``, ``1``, ... (as
            :class:`~tl_reversed.experiments.attention_patching.IterativePatching`).
        patch: the chosen step's patch, with the steps' ``lr`` folded in (its ``lr`` is 1);
            apply it with ``patch.hooks(model, prompts)``. ``None`` if step 0 was chosen.
        chosen_step: the step of :attr:`patch` (the last step for a fixed count; with
            ``steps="auto"``, the step of lowest training loss).
        n_train, n_test: set sizes; seconds: wall time.
    """

    lr: float
    accuracy: list[float]
    train_loss: list[float]
    patch: StructuredPatch | None
    chosen_step: int
    n_train: int
    n_test: int
    seconds: float = 0.0

    @property
    def steps(self) -> list[int]:
        return list(range(len(self.accuracy)))

    def to_dataframe(self) -> pd.DataFrame:
        """One row per step: step, lr, test accuracy (every length), training loss."""
        return pd.DataFrame({"step": self.steps, "lr": self.lr, "accuracy": self.accuracy,
                             "train_loss": self.train_loss[: len(self.accuracy)]})  # fmt: skip

    def plot(self, ax=None, **kwargs):
        """Test accuracy after each step, the chosen step marked; returns the matplotlib Figure."""
        from tl_reversed.views.plotting import figure_and_axes

        fig, ax = figure_and_axes(ax, (5, 3.5))
        ax.plot(self.steps, self.accuracy, marker="o", label=f"iterative structured RA, lr {self.lr:g}", **kwargs)
        ax.axvline(self.chosen_step, color="grey", linestyle=":", label=f"chosen step {self.chosen_step} (training loss)")
        ax.set_xlabel("step")
        ax.set_ylabel("top-1 accuracy, every test length")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize="small")
        return fig


def iterative_structured(
    model: object,
    train: object,
    test: object,
    lr: float = -10.0,
    steps: int | str = "auto",
    *,
    max_steps: int = 10,
    tol: float = 1e-3,
    threshold: float = 0.0,
    template: str | None = None,
    batch_size: int | None = 16,
    progress: bool | None = None,
) -> IterativeStructured:
    """Repeat structured RA patching ``steps`` times (or until the training loss plateaus).

    Step 1 is :func:`~tl_reversed.experiments.structured_patch.structured_maps` at ``lr``.
    Each later step computes the training prompts' RA with the accumulated structured
    patch applied and adds ``lr`` times its average on the template cells. Test accuracy
    (all test prompts, any lengths) is measured after every step.

    ``steps="auto"``: at most ``max_steps`` steps; stop as soon as the training loss
    reaches ``threshold`` or falls by less than ``tol`` (relative) below the best loss so
    far; the result's patch is the one of lowest training loss. Only training prompts
    are read for that choice.
    """
    auto = steps == "auto"
    n_steps = positive_int(max_steps if auto else steps, "max_steps" if auto else "steps")  # type: ignore[arg-type]
    lr, tol, threshold = finite_float(lr, "lr"), finite_float(tol, "tol"), finite_float(threshold, "threshold")
    optional_batch_size(batch_size)
    start = time.perf_counter()
    original = structured_accuracy(model, None, test, batch_size=batch_size)  # type: ignore[arg-type]
    accuracies = [float(original.mean())]
    losses: list[float] = []
    patches: list[StructuredPatch | None] = [None]
    current: StructuredPatch | None = None
    stopped = False
    for step in tqdm(range(n_steps), desc=f"iterative structured RA, lr {lr:g}", disable=not show_progress(progress, n_steps), leave=False):
        maps = structured_maps(model, train, "ra", template=template, under=current, batch_size=batch_size, progress=False)  # type: ignore[arg-type]
        losses.append(maps.loss)
        if auto and step > 0 and plateau(losses, tol, threshold):
            stopped = True
            break
        if current is not None and current.cells != maps.cells:
            raise RuntimeError("the training prompts' template cells changed between steps")  # same prompts every step
        total = lr * maps.maps if current is None else current.maps + lr * maps.maps
        current = dataclasses.replace(maps, maps=total, lr=1.0)
        patches.append(current)
        accuracies.append(float(structured_accuracy(model, current, test, batch_size=batch_size).mean()))  # type: ignore[arg-type]
    if not stopped:
        assert current is not None
        losses.append(structured_maps(model, train, "ra", template=template, under=current, batch_size=batch_size, progress=False).loss)  # type: ignore[arg-type]
    chosen = min(range(len(losses)), key=lambda s: (losses[s], s)) if auto else n_steps
    n_train = patches[-1].n_examples if patches[-1] is not None else 0
    return IterativeStructured(
        lr=float(lr), accuracy=accuracies, train_loss=losses, patch=patches[chosen], chosen_step=chosen,
        n_train=n_train, n_test=len(original),
        seconds=time.perf_counter() - start,
    )  # fmt: skip
