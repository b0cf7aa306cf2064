"""Figures and the HTML page of the backward lens (:class:`~tl_reversed.lens.results.BackwardLens`).

:func:`plot_lens` draws layer x position grids (paper Figure 5) with matplotlib;
:func:`render_html` writes the same grids as one self-contained page. In both the
colour of a cell is the norm of that site's VJP there (log scale by default), and its
text the token a descent step (``-VJP``) pushes toward most. The result classes call
these through :meth:`BackwardLens.plot` and :meth:`BackwardLens.to_html`.
"""

from __future__ import annotations

import html as html_lib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from tl_reversed.views.plotting import token_labels

if TYPE_CHECKING:  # pragma: no cover
    from tl_reversed.lens.results import BackwardLens


def _site_list(result: BackwardLens, site: str | Sequence[str] | None) -> list[str]:
    chosen = list(result.sites) if site is None else [site] if isinstance(site, str) else list(site)
    for s in chosen:
        result.site_index(s)
    return chosen


def _color_scale(values: np.ndarray, log: bool):
    """A matplotlib norm for VJP norms: log over the positive values, or linear from 0."""
    from matplotlib.colors import LogNorm, Normalize

    positive = values[values > 0]
    if not positive.size:
        return Normalize(vmin=0.0, vmax=1.0)
    if log:
        low, high = float(positive.min()), float(positive.max())
        return LogNorm(vmin=low, vmax=high if high > low else low * 10)
    return Normalize(vmin=0.0, vmax=float(positive.max()))


def plot_lens(result: BackwardLens, site: str | Sequence[str] | None = None, example: int = 0, *,
              log: bool = True, max_chars: int = 8):  # fmt: skip
    """Layer x position grids of one example, one panel per site (see :meth:`BackwardLens.plot`)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    chosen = _site_list(result, site)
    i = result.example_index(example)
    n = int(result.lengths[i])
    tokens = result.str_tokens[i]
    n_layers = len(result.layers)
    width = min(30.0, 0.75 * n + 2.0)
    height = min(24.0, 0.28 * n_layers + 1.8)
    fig = Figure(figsize=(width * len(chosen), height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(chosen), squeeze=False)).ravel()
    cmap = colormaps["viridis"].with_extremes(bad="white")
    for ax, name in zip(axes, chosen):
        s = result.site_index(name)
        values = result.norms[i, s, :, :n].double().numpy()
        scale = _color_scale(values, log)
        values = np.where(values > 0, values, np.nan)  # zero VJPs: blank cells
        image = ax.imshow(values, cmap=cmap, norm=scale, origin="lower", aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.8, label="VJP norm" + (" (log)" if log else ""))
        for j in range(n_layers):
            for p in range(n):
                token = result.vocab.get(int(result.top.toward_ids[i, s, j, p, 0]), "")
                shade = cmap(scale(values[j, p])) if np.isfinite(values[j, p]) else (1, 1, 1, 1)
                light = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] > 0.5
                text = token_labels([token[:max_chars]])[0]
                ax.text(p, j, text, ha="center", va="center", fontsize=6.5, color="black" if light else "white")
        ax.set_xticks(range(n), token_labels(tokens), rotation=90, fontsize=8)
        ax.set_yticks(range(n_layers), [str(layer) for layer in result.layers], fontsize=7)
        ax.set_xlabel("position (input token)")
        ax.set_ylabel("layer")
        ax.set_title(f"{name}: top token of -VJP")
    target = f"target {result.targets[i]!r}" if result.targets else "custom metric"
    fig.suptitle(f"Backward lens, {target} (cell text: token a descent step pushes toward)")
    return fig


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
.tlr-lens {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }}
.tlr-lens table {{ border-collapse: collapse; font-size: 12px; margin-bottom: 28px; }}
.tlr-lens th {{ font-weight: normal; color: #555; padding: 2px 4px; white-space: pre; font-family: ui-monospace, monospace; }}
.tlr-lens td {{ padding: 3px 5px; text-align: center; white-space: pre; font-family: ui-monospace, monospace;
      border: 1px solid #fff; min-width: 48px; }}
.tlr-lens .note {{ color: #555; max-width: 900px; }}
.tlr-lens .legend {{ display: flex; align-items: center; gap: 6px; font-size: 12px; color: #333; margin: 0 0 8px; }}
.tlr-lens .legend .bar {{ display: inline-block; width: 220px; height: 12px; border: 1px solid #bbb; }}
.tlr-lens .legend .lo, .tlr-lens .legend .hi {{ font-family: ui-monospace, monospace; }}
.tlr-lens .legend .caption {{ color: #555; margin-left: 8px; }}
</style></head><body><div class="tlr-lens">
<h1>{title}</h1>
<p class="note">Rows are layers (last layer on top), columns the input tokens. Each cell shows the token a
gradient-descent step pushes that site's output toward (top token of -VJP through the final norm and the
unembedding, projection "{projection}"); the background is the VJP norm, on the scale of the legend above
each table (one scale per site). Hover a cell for the norm, the {k} tokens pushed toward and away, and the
target's rank.</p>
{tables}
</div></body></html>
"""


def _legend(site: str, values: np.ndarray, scale, log: bool, cmap) -> str:
    """The colour bar of one site's table: the norms its ends stand for, and what the colour is."""
    from matplotlib.colors import to_hex

    esc = html_lib.escape
    if not (values > 0).any():
        caption = "every VJP of this site is zero in this example (no path to the loss): white cells"
        return f'<div class="legend" data-site="{esc(site)}"><span class="caption">{caption}</span></div>'
    low, high = float(scale.vmin), float(scale.vmax)
    kind = "log" if log else "linear"
    stops = ", ".join(f"{to_hex(cmap(t))} {100 * t:g}%" for t in np.linspace(0.0, 1.0, 11))
    span = "from the smallest nonzero norm" if log else "from 0"
    caption = (
        f"background: L2 norm of the VJP (dL/d activation) of each cell, {kind} scale {span} to the largest "
        "norm of this site in this example; white: a zero VJP"
    )
    return (
        f'<div class="legend" data-site="{esc(site)}" data-scale="{kind}" data-min="{low!r}" data-max="{high!r}">'
        f'<span class="lo">{low:.4g}</span>'
        f'<span class="bar" style="background:linear-gradient(to right, {stops})"></span>'
        f'<span class="hi">{high:.4g}</span><span class="caption">{esc(caption)}</span></div>'
    )


def render_html(
    result: BackwardLens, site: str | Sequence[str] | None = None, example: int = 0, *, log: bool = True
) -> str:
    """The page of :meth:`BackwardLens.to_html` (inline CSS only, no scripts, no URLs)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    esc = html_lib.escape
    chosen = _site_list(result, site)
    i = result.example_index(example)
    n = int(result.lengths[i])
    cmap = colormaps["viridis"]
    tables = []
    for name in chosen:
        s = result.site_index(name)
        values = result.norms[i, s, :, :n].double().numpy()
        scale = _color_scale(values, log)
        head = "".join(f"<th>{p}<br>{esc(t)}</th>" for p, t in enumerate(result.str_tokens[i]))
        rows = []
        for j in reversed(range(len(result.layers))):
            cells = []
            for p in range(n):
                rgba = cmap(scale(values[j, p])) if values[j, p] > 0 else (1.0, 1.0, 1.0, 1.0)
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.5
                toward = result.top_tokens(name, result.layers[j], p, i)
                away = result.top_tokens(name, result.layers[j], p, i, direction="away")
                tip = f"layer {result.layers[j]}, position {p}, norm {values[j, p]:.4g}\n"
                tip += "toward: " + ", ".join(repr(t) for t, _ in toward) + "\n"
                tip += "away: " + ", ".join(repr(t) for t, _ in away)
                if result.top.target_rank is not None:
                    tip += f"\ntarget rank: {int(result.top.target_rank[i, s, j, p])}"
                cells.append(
                    f'<td style="background:{to_hex(rgba)};color:{"#000" if light else "#fff"}" '
                    f'title="{esc(tip)}">{esc(toward[0][0] if toward else "")}</td>'
                )
            rows.append(f"<tr><th>{result.layers[j]}</th>{''.join(cells)}</tr>")
        tables.append(
            f"<h2>{esc(name)}</h2>{_legend(name, values, scale, log, cmap)}<table><tr><th>layer</th>{head}</tr>{''.join(rows)}</table>"
        )
    target = f"target {result.targets[i]!r}" if result.targets else "custom metric"
    prompt = f"{result.prompts[i]!r} " if result.prompts else ""
    title = f"Backward lens: {prompt}{target}"
    return _PAGE.format(title=esc(title), projection=esc(result.projection), k=result.k, tables="".join(tables))


__all__ = ["plot_lens", "render_html"]
