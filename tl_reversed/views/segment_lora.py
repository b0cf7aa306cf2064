"""Figures of the segment-mask LoRA runs: training losses and held-out accuracy per condition."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tl_reversed.views.plotting import figure_and_axes

COLOURS = {"causal": "tab:blue", "segments": "tab:orange"}


def plot_losses(runs: Sequence, ax: Axes | None = None) -> Figure:
    """Training loss against the step, one line per run (a :class:`~tl_reversed.experiments.segment_lora.LoRARun`)."""
    fig, ax = figure_and_axes(ax, (5.0, 3.4))
    for run in runs:
        label = f"{run.task + ', ' if run.task else ''}{run.mask} mask"
        ax.plot(range(1, len(run.losses) + 1), run.losses.numpy(), label=label, color=COLOURS.get(run.mask), lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("answer cross-entropy (batch)")
    ax.set_title("LoRA training loss")
    ax.legend(frameon=False, fontsize=8)
    return fig


def plot_accuracy(frame: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Held-out accuracy per ``model / mask`` condition (a comparison's ``to_dataframe()``), one group per task."""
    fig, ax = figure_and_axes(ax, (max(4.0, 1.6 * frame["task"].nunique() + 2.5), 3.4))
    conditions = list(dict.fromkeys(frame["model"] + " / " + frame["mask"]))
    tasks = list(dict.fromkeys(frame["task"]))
    width = 0.8 / len(conditions)
    for k, condition in enumerate(conditions):
        name, mask = condition.split(" / ")
        part = frame[(frame["model"] == name) & (frame["mask"] == mask)].set_index("task").reindex(tasks)
        hatch = "" if name != "base" else "//"
        xs = [i + (k - (len(conditions) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, part["accuracy"], width, label=condition, color=COLOURS.get(mask), alpha=0.45 if name == "base" else 0.9,
               hatch=hatch, edgecolor="black", linewidth=0.4)  # fmt: skip
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out top-1 accuracy")
    ax.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
