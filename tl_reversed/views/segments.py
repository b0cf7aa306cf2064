"""Figures of segment masks (MAS): the mask itself, and segment boundaries on any map."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Bool, Int
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tl_reversed.core.segments import prefill_mask

BOUNDARY_COLOR = "#d62728"


def boundaries(segment_ids: Sequence[int] | torch.Tensor) -> list[int]:
    """Positions where a new segment starts (after position 0): ``[0, 0, 1, 1, 2] -> [2, 4]``.

    Ids of ``-1`` (padding) are left out; where ids cover the prompt and generated or
    target tokens follow, callers add the prompt's end (``len(ids)``) themselves.
    """
    ids = [int(i) for i in (segment_ids.tolist() if isinstance(segment_ids, torch.Tensor) else segment_ids) if i >= 0]
    return [p for p in range(1, len(ids)) if ids[p] != ids[p - 1]]


def draw_boundaries(ax: Axes, starts: Sequence[int], rows: Sequence[int] | None = None) -> None:
    """Segment boundaries on a ``[query, key]`` image: a vertical line before each key
    position of ``starts``, and a horizontal line between the query rows on either side
    (``rows``: the query position of each row, for maps of chosen rows).
    """
    for p in starts:
        ax.axvline(p - 0.5, color=BOUNDARY_COLOR, linewidth=0.9)
    if rows is None:
        for p in starts:
            ax.axhline(p - 0.5, color=BOUNDARY_COLOR, linewidth=0.9)
        return
    for r in range(1, len(rows)):
        if any(rows[r - 1] < p <= rows[r] for p in starts):
            ax.axhline(r - 0.5, color=BOUNDARY_COLOR, linewidth=0.9)


def plot_segment_mask(
    mask: Bool[torch.Tensor, "query key"], str_tokens: Sequence[str], segment_ids: Int[torch.Tensor, " prompt"]
) -> Figure:
    """The attention mask (dark: allowed) with token labels and the segment boundaries in red."""
    from tl_reversed.views.plotting import token_labels

    data = np.asarray(mask.cpu().numpy(), dtype=float)
    n = data.shape[0]
    side = min(12.0, max(3.2, 0.3 * n + 1.2))
    fig = Figure(figsize=(side + 0.6, side + 0.6), layout="constrained")
    ax = fig.subplots()
    ax.imshow(data, cmap="Greys", vmin=0, vmax=1.4, interpolation="nearest")
    labels = token_labels(str_tokens)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    n_prompt = len(segment_ids)
    draw_boundaries(ax, boundaries(segment_ids) + ([n_prompt] if n > n_prompt else []))
    ax.set_title(f"segment mask: {len(boundaries(segment_ids)) + 1} segments, {n - n_prompt} generated tokens")
    return fig


# --------------------------------------------------------------------------- RA results run under a segment mask


def result_mask(result: object, example: int = 0) -> np.ndarray | None:
    """``[pos, pos]`` the mask one example of a ``ReversedAttention`` ran under; ``None`` if causal."""
    segments = getattr(result, "segments", None)
    if segments is None:
        return None
    i = example % len(result.lengths)  # type: ignore[attr-defined]
    prompt = segments[i][segments[i] >= 0]
    return prefill_mask(prompt, total_len=int(result.lengths[i]))[0].numpy()  # type: ignore[attr-defined]


def result_boundaries(result: object, example: int = 0) -> list[int]:
    """Where the example's segments start, and where its prompt ends (if tokens follow it)."""
    segments = getattr(result, "segments", None)
    if segments is None:
        return []
    i = example % len(result.lengths)  # type: ignore[attr-defined]
    n_prompt = int((segments[i] >= 0).sum())
    return boundaries(segments[i]) + ([n_prompt] if int(result.lengths[i]) > n_prompt else [])  # type: ignore[attr-defined]
