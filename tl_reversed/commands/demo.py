"""``tl-reversed demo``: RA on the embedded model, printed and drawn into ``out/``.

For one prompt and two targets (default "The capital city of France is" with " Paris"
and " Rome") it prints the top heads under each target and writes, into ``--out``:

- ``head_L{l}H{h}.png``: forward attention beside RA for the top heads (paper Fig. 1, 5);
- ``top_heads.png``: the top heads' RA maps on one colour scale (Fig. 9);
- ``norms.png``: layer x head heatmaps of forward-attention and RA norms (Fig. 2a);
- ``compare_L{l}H{h}.png``: the top head under both targets and the difference (Fig. 7);
- ``ra_map.html``: the interactive CircuitsVis map of the top heads (works offline);
- ``graph.html``: the flow graph of the prompt and first target over the last layers (offline);
- ``index.html``: all of the above on one page, each with a short explanation.

:func:`write_demo` does the work for an already loaded model (the tests call it).
"""

from __future__ import annotations

import argparse
import html
import time
from dataclasses import dataclass, field
from pathlib import Path

from tl_reversed.commands.common import add_model_argument, load_cli_model, positive_int, predicted_next, writable_folder
from tl_reversed.commands.heads import format_heads

PROMPT = "The capital city of France is"
TARGETS = (" Paris", " Rome")
HEAD_FIGURES = 3
GRAPH_LAYERS = 10  # the flow graph shows the last layers
DPI = 130


@dataclass
class DemoOutput:
    """What :func:`write_demo` wrote and computed."""

    out: Path
    index: Path
    html_map: Path
    figures: dict[str, Path]
    results: dict[str, object]  # target -> ReversedAttention
    predictions: str
    report: str = field(repr=False)
    graph_page: Path | None = None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="RA on one prompt under two targets: print the top heads, write figures and an HTML page",
        description="Compute Reversed Attention for PROMPT under two targets, print the top heads under "
        "each and write head figures, norm heatmaps, a two-target comparison, an interactive map and "
        "an index.html that shows them all into --out.",
    )
    parser.add_argument("--prompt", default=PROMPT, help=f"default {PROMPT!r}")
    parser.add_argument(
        "--targets", nargs=2, default=list(TARGETS), metavar=("A", "B"),
        help=f"two targets to compare (default {TARGETS[0]!r} {TARGETS[1]!r}; mind the leading space)",
    )  # fmt: skip
    parser.add_argument("--top", type=positive_int, default=10, help="heads to print and to show in the map (default 10)")
    parser.add_argument("--out", default="out", help="output folder (default out/)")
    add_model_argument(parser)
    return parser


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def write_demo(
    model,
    out: str | Path = "out",
    prompt: str = PROMPT,
    targets: tuple[str, str] | list[str] = TARGETS,
    top: int = 10,
) -> DemoOutput:
    """Compute RA for ``prompt`` under both ``targets`` and write the figures and pages into ``out``."""
    from tl_reversed import flow_graph, plotting, reversed_attention

    if len(targets) != 2:
        raise ValueError(f"the demo compares two targets; got {len(targets)}: {list(targets)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {target: reversed_attention(model, prompt, target) for target in targets}
    first, second = (results[t] for t in targets)
    prediction = predicted_next(model, prompt)

    lines = [f"prompt {prompt!r}; the model predicts {prediction!r}"]
    for target, result in results.items():
        lines += ["", f"target {target!r}: loss {float(result.loss[0]):.3f}", format_heads(result, top)]
    report = "\n".join(lines)

    figures: dict[str, Path] = {}
    heads = first.top_heads(HEAD_FIGURES)
    for layer, head in heads:
        figures[f"L{layer}H{head}"] = _save(plotting.plot_head(first, layer, head), out / f"head_L{layer}H{head}.png")
    figures["top_heads"] = _save(plotting.plot_top_heads(first, 6, shared_scale=True), out / "top_heads.png")
    figures["norms"] = _save(plotting.plot_norms(first), out / "norms.png")
    layer, head = heads[0]
    figures["compare"] = _save(
        plotting.plot_compare(first, second, layer, head), out / f"compare_L{layer}H{head}.png"
    )
    html_map = out / "ra_map.html"
    first.to_html(html_map, heads=first.top_heads(top))
    n_layers = model.cfg.n_layers
    graph_page = out / "graph.html"
    graph = flow_graph(model, prompt, targets[0], layers=range(max(0, n_layers - GRAPH_LAYERS), n_layers))
    graph.to_html(graph_page)
    index = out / "index.html"
    page = _index_page(prompt, targets, prediction, report, first, figures, heads, graph.layers)
    index.write_text(page, encoding="utf-8")
    return DemoOutput(out, index, html_map, figures, dict(results), prediction, report, graph_page)


def _figure(path: Path, title: str, text: str) -> str:
    return (
        f'<figure><h2>{html.escape(title)}</h2><p>{text}</p>'
        f'<a href="{path.name}"><img src="{path.name}" alt="{html.escape(title)}"></a></figure>'
    )


def _index_page(prompt, targets, prediction, report, result, figures, heads, graph_layers) -> str:
    a, b = (html.escape(repr(t)) for t in targets)
    tokens = "".join(f'<span class="tok">{html.escape(t)}</span>' for t in result.str_tokens[0])
    top = ", ".join(f"L{layer}H{head}" for layer, head in heads)
    top = f"the first {len(heads)} ({top})" if len(heads) > 1 else top
    layer, head = heads[0]
    sections = [
        _figure(
            figures[f"L{layer}H{head}"],
            f"The top head, L{layer}H{head}",
            f"Left: what the head attends to (each row, a query token, sums to 1). Right: its Reversed "
            f"Attention for target {a}, the gradient of the loss with respect to the head's "
            f"Q&middot;K<sup>T</sup>. Rows sum to zero. Blue keys gain attention after a gradient-descent "
            f"step, red keys lose it. Usually the last row (the token that predicts the target) dominates.",
        ),
        *(
            _figure(
                figures[f"L{l}H{h}"],
                f"Head L{l}H{h} (rank {rank})",
                "The same view for the next head by RA norm.",
            )
            for rank, (l, h) in enumerate(heads[1:], start=2)
        ),
        _figure(
            figures["top_heads"],
            "The top six heads on one scale",
            "RA maps of the six heads with the largest RA norm, on one shared colour scale, so the colours "
            "compare both where and how strongly the gradient pushes (paper Figure 9).",
        ),
        _figure(
            figures["norms"],
            "Norms of every head",
            "Layer x head heatmaps of the forward-attention norm (left) and the RA norm (right, the paper's "
            "head score; red outlines mark the top five). Heads that attend sharply are not necessarily the "
            "heads whose attention the loss most wants to change.",
        ),
        _figure(
            figures["compare"],
            f"L{layer}H{head} under two targets",
            f"The same head's RA when the target is {a} (left) and {b} (middle), on one scale, and their "
            f"difference (right). RA depends on the target: it is a gradient of that target's loss.",
        ),
    ]
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tl-reversed demo: {html.escape(prompt)}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 16px; }}
h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.2em; border-bottom: 1px solid #ddd; margin-top: 1.8em; }}
figure {{ margin: 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
pre {{ background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 0.85em; }}
.tok {{ white-space: pre; font-family: ui-monospace, monospace; background: #f3f3f3; border: 1px solid #ddd;
       border-radius: 3px; padding: 1px 4px; margin-right: 4px; }}
iframe {{ width: 100%; height: 1500px; border: 1px solid #ddd; }}
</style>
</head>
<body>
<h1>Reversed Attention on {html.escape(repr(prompt))}</h1>
<p>Reversed Attention (RA, Katz &amp; Wolf, NAACL 2025) is the attention map of the backward pass: for
each head, the gradient of the loss with respect to its query-key products. A gradient-descent step
moves attention along &minus;RA, so <b>negative (blue) entries are keys the step would attend to more</b>
and positive (red) entries keys it would attend to less. The loss here is the cross-entropy of the
target token after the prompt, for the targets {a} and {b}; the model itself predicts
{html.escape(repr(prediction))}.</p>
<p>Tokens: {tokens}</p>
<h2>Top heads</h2>
<p>The heads with the largest RA norm under each target, with the query row that dominates each map
and the keys that row pushes up (more attention) and down. The figures below show {top}.</p>
<pre>{html.escape(report)}</pre>
{''.join(sections)}
<h2>Interactive map</h2>
<p>The top heads' RA maps and forward attention in CircuitsVis (hover to inspect a cell, click a head to
lock it). Each RA map is scaled to its own largest |RA| with the sign kept.
<a href="ra_map.html">Open it on its own page</a>; it is one file that works offline.</p>
<iframe src="ra_map.html" title="interactive RA map"></iframe>
<h2>Flow graph</h2>
<p>The forward pass at the last prompt token as a flow graph (VISIT, Katz &amp; Belinkov 2023), layers
{graph_layers[0]}&ndash;{graph_layers[-1]}: residual states, the strongest heads, the memories they read and
the strongest MLP neurons, each read in the vocabulary, joined by their additive contributions. The
<i>backward</i> button lays the gradient for target {a} over the same nodes. Colour: the rank of {a}
(bright = rank 1). <a href="graph.html">Open it on its own page</a>; it is one file that works offline.</p>
<iframe src="graph.html" title="flow graph"></iframe>
</body>
</html>
"""


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    writable_folder(args.out)
    model = load_cli_model(args)
    output = write_demo(model, args.out, args.prompt, tuple(args.targets), args.top)
    print(output.report)
    seconds = time.perf_counter() - start
    print(f"\nwrote {len(output.figures)} figures, {output.html_map} and {output.index} in {seconds:.0f} s")
    print(f"open {output.index} in a browser")
    return 0
