"""The flow graph drawn: an interactive plotly Sankey page and a static matplotlib figure.

:func:`flow_graph_html` is one self-contained page: plotly's JavaScript is inlined from
the installed package (``plotly.min.js``, about 4.8 MB), nothing is fetched. The Sankey
has one trace per view (forward: contribution sizes; backward: ``|first-order loss
change|``) and buttons that switch between them; every node and edge has hover text.
Node colours show the tracked token's rank on the colour-blind-safe *cividis* scale
(bright = rank 1), forward: its logit-lens rank, backward: its rank among the tokens a
descent step pushes toward.
"""

from __future__ import annotations

import html as html_lib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tl_reversed.views.html import write_page

if TYPE_CHECKING:
    from tl_reversed.lens.flow_results import FlowGraph

VIEWS = ("forward", "backward")
LINK_COLOURS = {"residual": "rgba(120,120,120,0.35)", "skip": "rgba(120,120,120,0.2)", "head": "rgba(0,114,178,0.45)",
                "memory": "rgba(86,180,233,0.4)", "neuron": "rgba(230,159,0,0.45)"}  # fmt: skip
RANK_TICKS = (1, 10, 100, 1000, 10000, 100000)


def node_positions(graph: FlowGraph) -> dict[str, tuple[float, float]]:
    """Where each node sits: x = its layer and stage (residual, memories, heads, mid, neurons, post),
    y = 0 for the residual stream, heads at 1, 2, ..., their memories above, neurons at -1, -2, ..."""
    n = graph.nodes
    place: dict[str, tuple[float, float]] = {}
    stack: dict[tuple[int, str], int] = {}
    offsets = {"resid_pre": 0.0, "memory": 0.35, "head": 0.7, "resid_mid": 1.0, "neuron": 1.5, "resid_post": 2.0}
    for node_id, kind, layer in zip(n["id"], n["kind"], n["layer"]):
        start = 2 * (layer - graph.layers[0])
        if kind == "final":
            place[node_id] = (start + 1.0, 0.0)
            continue
        slot = stack.get((layer, kind), 0)
        stack[(layer, kind)] = slot + 1
        y = {"head": 1.0 + slot, "memory": 2.5 + 0.6 * slot, "neuron": -1.0 - slot}.get(kind, 0.0)
        place[node_id] = (start + offsets[kind], y)
    return place


def _sankey_xy(graph: FlowGraph) -> tuple[list[float], list[float]]:
    """:func:`node_positions` scaled into plotly's [0, 1] square (y grows downward there)."""
    xs, ys = zip(*node_positions(graph).values())
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    scale = lambda v, lo, hi: 0.03 + 0.92 * (v - lo) / (hi - lo) if hi > lo else 0.5  # noqa: E731
    return [scale(x, x0, x1) for x in xs], [scale(y1 - y, y0, y1) for y in ys]


def _check_view(view: str, graph: FlowGraph) -> str:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if view == "backward" and not graph.backward:
        raise ValueError("this graph has no backward view: compute it with a target and backward=True")
    return view


def rank_shade(ranks: list[int], d_vocab: int) -> np.ndarray:
    """Rank 1 -> 1.0, rank ``d_vocab`` -> 0.0 on a log scale; NaN where there is no rank (-1)."""
    r = np.asarray(ranks, dtype=float)
    shade = 1.0 - np.log10(np.clip(r, 1, None)) / math.log10(max(d_vocab, 10))
    return np.where(r < 1, np.nan, shade)


def _colours(shades: np.ndarray) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["cividis"]
    return ["#bbbbbb" if math.isnan(s) else to_hex(cmap(float(s))) for s in shades]


def _tokens(tokens: list[str], probs: list[float] | None = None) -> str:
    esc = [html_lib.escape(repr(t), quote=False) for t in tokens]
    if probs is None:
        return ", ".join(esc)
    return ", ".join(f"{t} {p:.3f}" for t, p in zip(esc, probs))


def node_hover(graph: FlowGraph) -> list[str]:
    """The hover text of every node: tokens and probabilities, the tracked token, norms, the backward view."""
    n = graph.nodes
    tracked = html_lib.escape(repr(graph.tracked), quote=False)
    texts = []
    for i, name in enumerate(n["name"]):
        lines = [
            f"<b>{html_lib.escape(name, quote=False)}</b> (norm {n['norm'][i]:.3g})",
            f"logit lens: {_tokens(n['top_tokens'][i], n['top_probs'][i])}",
            f"{tracked}: rank {n['rank'][i]}, p {n['prob'][i]:.3g}; entropy {n['entropy'][i]:.2f} nats",
        ]
        if graph.backward and n["toward"][i]:
            lines += [
                f"descent pushes toward: {_tokens(n['toward'][i])}",
                f"and away from: {_tokens(n['away'][i])}",
                f"{tracked} rank among pushed-toward: {n['backward_rank'][i]}",
            ]
        if graph.backward and not math.isnan(n["dloss"][i]):
            lines.append(f"first-order loss change: {n['dloss'][i]:+.3g}")
        if n["kind"][i] == "head" and graph.ra_rows is not None:
            row = graph.ra_rows[graph.layers.index(n["layer"][i]), n["head"][i]]
            up = [graph.str_tokens[k] for k in row.argsort()[:3].tolist() if row[k] < 0]
            down = [graph.str_tokens[k] for k in row.argsort(descending=True)[:3].tolist() if row[k] > 0]
            lines.append(f"RA row: attend more to {_tokens(up)}; less to {_tokens(down)}")
        if n["kind"][i] == "memory" and graph.backward:
            lines.append(f"RA entry {n['ra'][i]:+.3g} ({'attend more' if n['ra'][i] < 0 else 'attend less'})")
        texts.append("<br>".join(lines))
    return texts


def _edge_hover(graph: FlowGraph, names: dict[str, str]) -> list[str]:
    e = graph.edges
    out = []
    for i, kind in enumerate(e["kind"]):
        text = f"{html_lib.escape(names[e['source'][i]], quote=False)} → {html_lib.escape(names[e['target'][i]], quote=False)} ({kind})<br>weight {e['weight'][i]:.3g}"
        if graph.backward:
            text += f"<br>first-order loss change {e['dloss'][i]:+.3g}"
        out.append(text)
    return out


def sankey_figure(graph: FlowGraph, title: str | None = None):
    """The plotly Figure: one Sankey per view, a view switch, and the rank colour bar."""
    import plotly.graph_objects as go

    n, e = graph.nodes, graph.edges
    index = {node_id: i for i, node_id in enumerate(n["id"])}
    names = dict(zip(n["id"], n["name"]))
    labels = [f"{name}: {tokens[0]!r}" for name, tokens in zip(n["name"], n["top_tokens"])]
    hover = node_hover(graph)
    edge_hover = _edge_hover(graph, names)
    d_vocab = graph.final_logits.shape[0]
    views = [v for v in VIEWS if v == "forward" or graph.backward]
    x, y = _sankey_xy(graph)
    traces = []
    for view in views:
        ranks = n["rank"] if view == "forward" else n["backward_rank"]
        weights = np.asarray(e["weight"] if view == "forward" else e["backward_weight"], dtype=float)
        floor = 1e-3 * float(np.nanmax(weights)) if np.isfinite(weights).any() and np.nanmax(weights) > 0 else 1.0
        traces.append(go.Sankey(
            name=view, visible=view == "forward", arrangement="snap", valueformat=".3g",
            node=dict(label=labels, color=_colours(rank_shade(ranks, d_vocab)), customdata=hover, x=x, y=y,
                      hovertemplate="%{customdata}<extra></extra>", pad=6, thickness=12),
            link=dict(source=[index[s] for s in e["source"]], target=[index[t] for t in e["target"]],
                      value=np.maximum(np.nan_to_num(weights), floor).tolist(), customdata=edge_hover,
                      color=[LINK_COLOURS.get(k, "rgba(120,120,120,0.3)") for k in e["kind"]],
                      hovertemplate="%{customdata}<extra></extra>"),
        ))  # fmt: skip
    ticks = [r for r in RANK_TICKS if r <= d_vocab]
    traces.append(go.Scatter(
        x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
        marker=dict(colorscale="Cividis", cmin=0, cmax=1, color=[1], showscale=True,
                    colorbar=dict(title=dict(text=f"rank of {graph.tracked!r}"), tickvals=rank_shade(ticks, d_vocab).tolist(),
                                  ticktext=[str(r) for r in ticks], len=0.6)),
    ))  # fmt: skip
    buttons = [
        dict(label=view, method="update",
             args=[{"visible": [v == view for v in views] + [True]}, {"title.text": _title(graph, view, title)}])
        for view in views
    ]  # fmt: skip
    fig = go.Figure(traces)
    fig.update_layout(
        title=dict(text=_title(graph, "forward", title)), height=max(600, 70 * len(set(y))),
        xaxis=dict(visible=False), yaxis=dict(visible=False), plot_bgcolor="white", font=dict(size=10),
        updatemenus=[dict(type="buttons", direction="right", x=0, y=1.08, xanchor="left", buttons=buttons)] if len(views) > 1 else [],
    )  # fmt: skip
    return fig


def _title(graph: FlowGraph, view: str, title: str | None) -> str:
    what = title or f"{graph.prompt!r} → {graph.target!r}" if graph.target else f"{graph.prompt!r}"
    how = "forward: contribution sizes" if view == "forward" else "backward: |first-order loss change|"
    return html_lib.escape(f"{what} — position {graph.position} {graph.str_tokens[graph.position]!r} — {how}")


def flow_graph_html(graph: FlowGraph, path: str | Path | None = None, *, title: str | None = None) -> str:
    """The self-contained page of the graph, written to ``path`` when given; returns it as a string."""
    try:
        import plotly  # noqa: F401
    except ImportError as error:  # pragma: no cover - plotly is a dependency
        raise ImportError("the flow graph page needs plotly: pip install plotly") from error
    fig = sankey_figure(graph, title)
    body = fig.to_html(full_html=False, include_plotlyjs=True, include_mathjax=False, div_id="flow-graph",
                       config={"displaylogo": False, "responsive": True})  # fmt: skip
    heading = html_lib.escape(title or "Flow graph")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{heading}</title>
<style>body{{font-family:sans-serif;margin:1em}} p{{max-width:60em}}</style></head>
<body><h1>{heading}</h1>
<p>Prompt {html_lib.escape(repr(graph.prompt))}, target {html_lib.escape(repr(graph.target))}, position {graph.position}
({html_lib.escape(repr(graph.str_tokens[graph.position]))}), layers {graph.layers[0]}–{graph.layers[-1]}, {len(graph)} nodes.
Nodes are residual states, heads, memories (a head's read of one key position) and neurons; edges are
additive contributions. Colour: the rank of {html_lib.escape(repr(graph.tracked))} (cividis, bright = rank 1).
Hover a node for its tokens; the buttons switch between the forward and backward views.</p>
{body}
</body></html>
"""
    if path is not None:
        write_page(page, path)
    return page


def plot_flow_graph(graph: FlowGraph, view: str = "forward", ax=None):
    """A static figure: layers left to right, residual nodes on the middle line, heads and their
    memories above, neurons below; edge width = weight of the view, node colour = rank (cividis)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    _check_view(view, graph)
    n, e = graph.nodes, graph.edges
    place = node_positions(graph)
    if ax is None:
        fig = Figure(figsize=(max(6.0, 1.3 * len(graph.layers) + 2), 6))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    weights = np.asarray(e["weight"] if view == "forward" else e["backward_weight"], dtype=float)
    top = float(np.nanmax(weights)) if np.isfinite(weights).any() and np.nanmax(weights) > 0 else 1.0
    for s, t, w in zip(e["source"], e["target"], weights):
        (x0, y0), (x1, y1) = place[s], place[t]
        ax.plot([x0, x1], [y0, y1], color="0.5", alpha=0.6, lw=0.3 + 4 * (0 if math.isnan(w) else w) / top, zorder=1)
    shades = rank_shade(n["rank"] if view == "forward" else n["backward_rank"], graph.final_logits.shape[0])
    cmap = colormaps["cividis"]
    xs, ys = zip(*(place[i] for i in n["id"]))
    ax.scatter(xs, ys, c=[cmap(float(s)) if not math.isnan(s) else "0.75" for s in shades], s=60, zorder=2,
               edgecolors="0.2", linewidths=0.5)  # fmt: skip
    tokens = n["top_tokens"] if view == "forward" else [t or [""] for t in n["toward"]]
    for (x, y), tok in zip(zip(xs, ys), tokens):
        ax.annotate(repr(tok[0])[:10], (x, y), fontsize=6, xytext=(0, 5), textcoords="offset points", ha="center")
    ax.set_xticks([2 * (layer - graph.layers[0]) + 1 for layer in graph.layers], [f"L{layer}" for layer in graph.layers])
    ax.set_yticks([])
    ax.set_title(f"flow graph ({view}): {graph.prompt!r} → {graph.tracked!r}, position {graph.position}", fontsize=9)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return fig
