"""Matplotlib figures of Reversed Attention, after the paper's figures.

Every function returns a :class:`matplotlib.figure.Figure` and never calls
``plt.show()``. Figures are built without pyplot (``Figure()`` directly), so they work
on headless machines whatever the configured backend is, never open a window, and
never pile up in pyplot's figure registry. Save one with ``fig.savefig("x.png")``; in
Jupyter, a returned figure displays once ``%matplotlib inline`` is on (or pyplot has
been imported).

Colours: forward attention on a sequential scale from 0 to 1; RA on a red-white-blue
scale centred at zero with symmetric limits. RA is the plain gradient of the loss with
respect to ``Q @ K^T``, and a gradient-descent step moves attention along ``-RA``:
**blue (negative) keys get more attention after the step, red (positive) keys less.**

============================  =========================================================
:func:`plot_head`             forward attention beside RA for one head (Figures 1, 2b-c, 5)
:func:`plot_norms`            layer x head heatmaps of FA and RA norms (Figure 2a)
:func:`plot_top_heads`        the k heads with the largest RA norm (Figure 9)
:func:`plot_compare`          one head under two targets, and their difference (Figure 7)
:func:`plot_perturbation`     accuracy while keeping the top fraction of heads (Figure 11)
:func:`plot_lr_sweep`         attention-patching accuracy against learning rate (Figure 12)
============================  =========================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tl_reversed.experiments.perturbation import auc as curve_auc  # the one AUC (trapezoid over the fractions)
from tl_reversed.views.segments import draw_boundaries, result_boundaries, result_mask

if TYPE_CHECKING:  # pragma: no cover
    from tl_reversed.core.reversed_attention import ReversedAttention

FA_CMAP = "Blues"
RA_CMAP = "RdBu_r"  # negative (attention goes up after a descent step) blue, positive red
NORM_CMAP = "viridis"
MASKED_COLOR = "#eeeeee"
SIGN_NOTE = "RA = dL/d(QK$^T$). A descent step moves attention along $-$RA: blue keys gain attention, red keys lose it."


# --------------------------------------------------------------------------- helpers


def token_labels(tokens: Sequence[str]) -> list[str]:
    """Tokens as tick labels: unchanged except that newlines, tabs and ``$`` are escaped.

    ``$`` would switch matplotlib into mathtext; a raw newline would break the axis.
    """
    return [t.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$") for t in tokens]


def symmetric_limit(*maps: np.ndarray | torch.Tensor) -> float:
    """The largest absolute value over ``maps`` (at least a tiny positive number)."""
    arrays = [m.detach().cpu().double().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, float) for m in maps]
    biggest = max((float(np.abs(a).max(initial=0.0)) for a in arrays), default=0.0)
    return biggest if biggest > 0 else 1e-12


def _causal(
    matrix: Float[torch.Tensor, "query_pos key_pos"] | np.ndarray, rows: Sequence[int] | None = None,
    allowed: np.ndarray | None = None,
) -> np.ma.MaskedArray:
    """The matrix as a masked array with the strict upper triangle (future keys) masked.

    ``rows``: the query position of each row (maps of chosen query rows); keys after it are masked.
    ``allowed``: a segment mask ``[pos, pos]`` to mask by instead (the keys each query may see).
    """
    data = matrix.detach().cpu().float().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    n_query, n_key = data.shape
    if allowed is not None:
        return np.ma.masked_array(data, mask=~allowed[list(range(n_query)) if rows is None else list(rows), :n_key])
    if rows is not None:
        future = np.arange(n_key)[None, :] > np.asarray(rows)[:, None]
        return np.ma.masked_array(data, mask=future)
    future = np.triu(np.ones((n_query, n_key), dtype=bool), k=1 + n_key - n_query)
    return np.ma.masked_array(data, mask=future)


def _rows(result: ReversedAttention, example: int) -> list[int] | None:
    """The kept query positions of a result of chosen rows, ``None`` for whole maps."""
    return None if result.query_positions is None else result.rows(example)


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=MASKED_COLOR)


def _label_tokens(ax: Axes, tokens: Sequence[str], fontsize: float = 8, rows: Sequence[int] | None = None) -> None:
    """Token labels on both axes: keys along x (rotated), queries along y (``rows`` only, if given)."""
    labels = token_labels(tokens)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=fontsize)
    queries = range(len(labels)) if rows is None else rows
    ax.set_yticks(range(len(queries)), [f"{labels[q]} ({q})" if rows is not None else labels[q] for q in queries],
                  fontsize=fontsize)  # fmt: skip
    ax.set_xlabel("key")
    ax.set_ylabel("query")


def _ra_image(ax: Axes, ra: np.ma.MaskedArray, limit: float):
    return ax.imshow(ra, cmap=_cmap(RA_CMAP), vmin=-limit, vmax=limit, interpolation="nearest")


def _target_text(result: ReversedAttention, example: int) -> str:
    """``"target ' Paris'"``, or ``""`` where the result has no targets (a metric, a cache)."""
    target = _short_target(result, example)
    return f"target {target}" if target else ""


def _short_target(result: ReversedAttention, example: int) -> str:
    if result.targets:
        return repr(result.targets[example % len(result.targets)]).replace("$", r"\$")
    return ""


def _check_maps(result: ReversedAttention) -> None:
    if result.maps is None or result.pattern is None:
        raise ValueError("this result kept only norms: call reversed_attention(..., keep='maps') to plot maps")


def _map_size(n_tokens: int) -> float:
    """Inches per map side for ``n_tokens`` tokens."""
    return min(12.0, max(3.2, 0.32 * n_tokens + 1.2))


# --------------------------------------------------------------------------- maps


def plot_head(result: ReversedAttention, layer: int, head: int, example: int = 0) -> Figure:
    """Forward attention beside Reversed Attention for one head (paper Figures 1, 2b-c, 5).

    Left: the forward pattern on a 0..1 sequential scale. Right: RA on a diverging scale
    centred at zero with symmetric limits ``[-max|RA|, max|RA|]``. Future keys (the
    strict upper triangle) are masked (under a segment mask: the keys it hides, with the
    segment boundaries drawn in red); both axes carry the example's tokens. The figure's
    title is ``L{layer}H{head}``.

    Returns:
        A Figure whose first two axes are the forward-attention and RA maps (the other
        two are their colour bars).
    """
    _check_maps(result)
    tokens = result.str_tokens[result._example(example)]
    rows = _rows(result, example)
    fa = _causal(result.head_pattern(layer, head, example), rows, result_mask(result, example))
    ra = _causal(result.head(layer, head, example), rows, result_mask(result, example))
    side = _map_size(len(tokens))
    height = side if rows is None else min(side, 0.32 * len(rows) + 1.5)
    fig = Figure(figsize=(2 * side + 1.6, height + 0.9), layout="constrained")
    ax_fa, ax_ra = fig.subplots(1, 2)
    image = ax_fa.imshow(fa, cmap=_cmap(FA_CMAP), vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax_fa, shrink=0.8, label="attention")
    ax_fa.set_title("forward attention")
    image = _ra_image(ax_ra, ra, symmetric_limit(ra.compressed()))
    fig.colorbar(image, ax=ax_ra, shrink=0.8, label="RA (blue: gains attention)")
    ax_ra.set_title("reversed attention" + (f"\n{_target_text(result, example)}" if result.targets else ""))
    for ax in (ax_fa, ax_ra):
        _label_tokens(ax, tokens, rows=rows)
        draw_boundaries(ax, result_boundaries(result, example), rows)
        ax.set_aspect("auto" if rows is not None else "equal")
    fig.suptitle(f"L{layer}H{head}", fontweight="bold")
    fig.supxlabel(SIGN_NOTE, fontsize=8, color="0.3")
    return fig


def plot_top_heads(
    result: ReversedAttention, k: int = 6, shared_scale: bool = False, example: int = 0, ncols: int | None = None
) -> Figure:
    """RA maps of the ``k`` heads with the largest mean RA norm, largest first (Figure 9).

    ``shared_scale=False`` gives each head its own symmetric limits (shape of each map);
    ``shared_scale=True`` puts every head on one symmetric scale, so the colours also
    compare magnitudes across heads, as in the paper's Figure 9.

    Returns:
        A Figure whose first ``k`` axes are the maps, titled ``L{l}H{h}``, in rank order.
    """
    _check_maps(result)
    heads = result.top_heads(k)
    tokens = result.str_tokens[result._example(example)]
    rows = _rows(result, example)
    maps = [_causal(result.head(layer, head, example), rows, result_mask(result, example)) for layer, head in heads]
    ncols = ncols or min(len(heads), 3)
    nrows = math.ceil(len(heads) / ncols)
    side = min(_map_size(len(tokens)), 4.5)
    fig = Figure(figsize=(ncols * (side + 0.9) + 0.6, nrows * (side + 0.7) + 0.6), layout="constrained")
    grid = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    shared = symmetric_limit(*(m.compressed() for m in maps))
    images = []
    for ax, (layer, head), ra in zip(grid, heads, maps):
        limit = shared if shared_scale else symmetric_limit(ra.compressed())
        image = _ra_image(ax, ra, limit)
        images.append(image)
        ax.set_title(f"L{layer}H{head}")
        _label_tokens(ax, tokens, fontsize=7, rows=rows)
        draw_boundaries(ax, result_boundaries(result, example), rows)
        if rows is not None:
            ax.set_aspect("auto")
        if not shared_scale:
            fig.colorbar(image, ax=ax, shrink=0.8)
    for ax in grid[len(heads) :]:
        fig.delaxes(ax)
    if shared_scale and images:
        fig.colorbar(images[0], ax=list(grid[: len(heads)]), shrink=0.6, label="RA (one scale)")
    scale = "one shared scale" if shared_scale else "each head on its own scale"
    target = f", {_target_text(result, example)}" if result.targets else ""
    fig.suptitle(f"Top {len(heads)} heads by RA norm{target} ({scale})")
    fig.supxlabel(SIGN_NOTE, fontsize=8, color="0.3")
    return fig


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def plot_compare(
    result_a: ReversedAttention,
    result_b: ReversedAttention,
    layer: int,
    head: int,
    example: int = 0,
    labels: tuple[str, str] | None = None,
) -> Figure:
    """One head's RA under two targets (or two metrics), and their difference (Figure 7).

    The two maps share one symmetric scale, so their colours compare directly; the third
    panel is ``RA_a - RA_b`` on its own symmetric scale. When the inputs differ (targets
    of several tokens), the maps are compared over the tokens the two share at the start.

    Args:
        labels: names of the two runs (default: their targets).

    Returns:
        A Figure whose first three axes are RA under a, RA under b, and the difference.
    """
    for r in (result_a, result_b):
        _check_maps(r)
        if r.query_positions is not None:
            raise ValueError(
                "plot_compare compares whole maps; these results kept chosen query rows: "
                "call reversed_attention without query_positions, or plot each with plot_head"
            )
    tokens_a = result_a.str_tokens[result_a._example(example)]
    tokens_b = result_b.str_tokens[result_b._example(example)]
    n = _common_prefix(tokens_a, tokens_b)
    if n == 0:
        raise ValueError("the two results share no leading tokens: compare runs of the same prompt")
    tokens = tokens_a[:n]
    a = result_a.head(layer, head, example)[:n, :n]
    b = result_b.head(layer, head, example)[:n, :n]
    labels = labels or (_short_target(result_a, example) or "first", _short_target(result_b, example) or "second")
    maps = [_causal(a), _causal(b), _causal(a - b)]
    side = min(_map_size(n), 5.5)
    fig = Figure(figsize=(3 * side + 2.4, side + 1.2), layout="constrained")
    axes = fig.subplots(1, 3)
    shared = symmetric_limit(maps[0].compressed(), maps[1].compressed())
    titles = [labels[0], labels[1], f"difference\n{labels[0]} $-$ {labels[1]}"]
    for i, (ax, ra, title) in enumerate(zip(axes, maps, titles)):
        image = _ra_image(ax, ra, shared if i < 2 else symmetric_limit(ra.compressed()))
        ax.set_title(title)
        _label_tokens(ax, tokens)
        if i > 0:
            fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"L{layer}H{head}: RA under two targets", fontweight="bold")
    fig.supxlabel(SIGN_NOTE, fontsize=8, color="0.3")
    return fig


# --------------------------------------------------------------------------- norms


def plot_norms(result: ReversedAttention, example: int | None = None, top: int = 5) -> Figure:
    """Layer x head heatmaps of forward-attention norms and RA norms, side by side (Figure 2a).

    Args:
        example: one example's norms; ``None`` (default) averages over examples, which is
            the paper's head score.
        top: outline the ``top`` heads with the largest RA norm (0 for none).

    Returns:
        A Figure whose first two axes are the FA-norm and RA-norm heatmaps (layers on the
        y axis, heads on the x axis).
    """
    if example is None:
        fa, ra = result.pattern_norms.mean(0), result.norms.mean(0)
        which = f"mean over {len(result)} example{'s' if len(result) != 1 else ''}"
    else:
        i = result._example(example)
        fa, ra = result.pattern_norms[i], result.norms[i]
        which = f"example {i}"
    n_layers, n_heads = ra.shape
    height = min(14.0, max(3.5, 0.28 * n_layers + 1.5))
    width = min(8.0, max(2.8, 0.45 * n_heads + 1.5))
    fig = Figure(figsize=(2 * width, height), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, values, title in zip(axes, (fa, ra), ("forward attention norm", "reversed attention norm")):
        image = ax.imshow(values.numpy(), cmap=NORM_CMAP, aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(title)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)], fontsize=8)
        step = max(1, math.ceil(n_layers / 30))
        ax.set_yticks(range(0, n_layers, step), [str(result.layers[j]) for j in range(0, n_layers, step)], fontsize=8)
    order = ra.flatten().argsort(descending=True)[: max(0, top)]
    for i in order.tolist():
        row, col = divmod(i, n_heads)
        for ax in axes:
            ax.add_patch(_outline(col, row))
    fig.suptitle(f"Head norms ({which}); outlined: top {len(order)} by RA norm")
    return fig


def _outline(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5)


# --------------------------------------------------------------------------- experiments


REVERSED_SUFFIXES = (" (reversed)", " reversed", "_reversed", "-reversed")


def _base_name(method: str) -> tuple[str, bool]:
    """``("RA", True)`` for ``"RA reversed"``; ``(method, False)`` otherwise."""
    for suffix in REVERSED_SUFFIXES:
        if method.lower().endswith(suffix):
            return method[: -len(suffix)], True
    return method, False


def perturbation_frame(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]] | pd.DataFrame,
) -> pd.DataFrame:
    """Curves as a DataFrame ``method, fraction, accuracy``, one row per point.

    Accepts a dict ``{method: (fractions, accuracies)}`` or a DataFrame with those
    columns; rows repeating one ``(method, fraction)`` (several tasks) are averaged.
    """
    if isinstance(curves, pd.DataFrame):
        missing = {"method", "fraction", "accuracy"} - set(curves.columns)
        if missing:
            raise ValueError(f"the DataFrame needs columns method, fraction, accuracy; missing {sorted(missing)}")
        frame = curves[["method", "fraction", "accuracy"]]
    else:
        rows = []
        for method, (fractions, accuracies) in curves.items():
            if len(fractions) != len(accuracies):
                raise ValueError(f"{method}: {len(fractions)} fractions but {len(accuracies)} accuracies")
            rows += [(method, float(f), float(a)) for f, a in zip(fractions, accuracies)]
        frame = pd.DataFrame(rows, columns=["method", "fraction", "accuracy"])
    grouped = frame.groupby(["method", "fraction"], sort=False, as_index=False)["accuracy"].mean()
    first_seen = {m: i for i, m in enumerate(dict.fromkeys(grouped["method"]))}
    order = grouped["method"].map(first_seen)
    ordered = grouped.assign(_order=order).sort_values(["_order", "fraction"])
    return ordered.drop(columns="_order").reset_index(drop=True)


def figure_row(n: int, panel: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """A figure of ``n`` panels side by side, each ``panel`` inches, sharing the y axis."""
    fig = Figure(figsize=(panel[0] * n, panel[1]), layout="constrained")
    return fig, list(fig.subplots(1, n, squeeze=False, sharey=True)[0])


def figure_and_axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    """``ax`` and its figure, or a new constrained-layout figure of ``size`` inches with one axes."""
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots()




def plot_perturbation(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]] | pd.DataFrame,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Perturbation curves: top-1 accuracy while keeping the top fraction of heads (Figure 11).

    Args:
        curves: ``{method: (fractions, accuracies)}``, or a DataFrame with columns
            ``method``, ``fraction`` (0..1, the share of heads kept) and ``accuracy``.
            Rows repeating a ``(method, fraction)`` pair (e.g. several tasks) are averaged.
            A method named ``"<name> reversed"`` (also ``" (reversed)"``, ``"_reversed"``,
            ``"-reversed"``) is drawn dashed in the colour of ``<name>``.
        title: the axes title.
        ax: draw into these axes instead of a new figure.

    Returns:
        The Figure; one line per method, labelled with its area under the curve.
    """
    frame = perturbation_frame(curves)
    fig, ax = figure_and_axes(ax, (6.0, 4.2))
    colours: dict[str, str] = {}
    palette = iter([f"C{i}" for i in range(100)])
    methods = list(dict.fromkeys(frame["method"]))
    for method in sorted(methods, key=lambda m: _base_name(m)[1]):  # plain names pick colours first
        base, reversed_ = _base_name(method)
        colour = colours.setdefault(base, next(palette))
        part = frame[frame["method"] == method]
        auc = curve_auc(part["fraction"], part["accuracy"])
        ax.plot(
            part["fraction"], part["accuracy"], marker="o", markersize=3, color=colour,
            linestyle="--" if reversed_ else "-", label=f"{method} (AUC {auc:.3f})",
        )  # fmt: skip
    ax.set_xlabel("fraction of heads kept (the rest zeroed)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Perturbation test")
    return fig


def plot_singular_values(result, ax: Axes | None = None) -> Figure:
    """Singular values of a :class:`~tl_reversed.lens.backward_lens.GradientRank` gradient (log axis).

    A dotted line marks the numerical rank, a dashed one the lemma's bound
    ``min(n_positions, d_in, d_out)``: the values fall to round-off past the rank.
    """
    fig, ax = figure_and_axes(ax, (5.0, 3.5))
    values = result.singular_values.double().numpy()
    ax.semilogy(np.arange(1, len(values) + 1), np.clip(values, np.finfo(float).tiny, None), marker=".", label="singular values")
    ax.axvline(result.rank, color="C1", linestyle=":", label=f"numerical rank {result.rank}")
    ax.axvline(result.bound, color="grey", linestyle="--", label=f"bound {result.bound}")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title(f"gradient of {result.matrix}, layer {result.layer} ({result.n_positions} positions)")
    ax.legend(fontsize=8)
    return fig


def plot_lr_sweep(
    df: pd.DataFrame,
    baselines: Mapping[str, float] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    xscale: str = "linear",
) -> Figure:
    """Attention-patching accuracy against the learning rate, one line per source (Figure 12).

    Args:
        df: a DataFrame with columns ``lr``, ``accuracy`` and ``source`` (e.g. ``"RA"``,
            ``"FA"``). Rows repeating a ``(source, lr)`` pair (several tasks or seeds) are
            averaged, with their min..max range shaded.
        baselines: horizontal reference lines, e.g. ``{"0-shot": 0.03, "5-shot": 0.9}``.
        title: the axes title.
        ax: draw into these axes instead of a new figure.
        xscale: ``"linear"`` or ``"symlog"`` (for sweeps over orders of magnitude).

    Returns:
        The Figure.
    """
    missing = {"lr", "accuracy", "source"} - set(df.columns)
    if missing:
        raise ValueError(f"the DataFrame needs columns lr, accuracy, source; missing {sorted(missing)}")
    fig, ax = figure_and_axes(ax, (6.0, 4.2))
    stats = df.groupby(["source", "lr"], sort=False)["accuracy"].agg(["mean", "min", "max", "count"]).reset_index()
    for i, source in enumerate(dict.fromkeys(stats["source"])):
        part = stats[stats["source"] == source].sort_values("lr")
        ax.plot(part["lr"], part["mean"], marker="o", markersize=4, color=f"C{i}", label=str(source))
        if int(part["count"].max()) > 1:
            ax.fill_between(part["lr"], part["min"], part["max"], color=f"C{i}", alpha=0.15, linewidth=0)
    for j, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, color="0.4", linestyle=(0, (1 + j, 2)), linewidth=1, label=f"{name} ({value:.2f})")
    ax.set_xscale(xscale)
    ax.set_xlabel("learning rate (RA patch: pattern += lr * mean RA)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Attention patching: learning-rate sweep")
    return fig
