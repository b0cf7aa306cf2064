"""``tl-reversed graph``: the flow graph of one prompt as an offline interactive page."""

from __future__ import annotations

import argparse
from pathlib import Path

from tl_reversed.commands.common import (
    CommandError,
    add_format_argument,
    add_model_argument,
    load_cli_model,
    print_table,
    writable_folder,
)
from tl_reversed.core.options import RANK_BY


def layer_range(text: str) -> list[int]:
    """``"20-29"`` -> ``[20, ..., 29]``, ``"0,3,5"`` -> ``[0, 3, 5]``, ``"7"`` -> ``[7]`` (argparse type)."""
    try:
        layers: list[int] = []
        for part in (p.strip() for p in text.split(",") if p.strip()):
            first, _, last = part.partition("-")
            lo, hi = int(first), int(last or first)
            if lo < 0 or hi < lo:
                raise ValueError
            layers += range(lo, hi + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layers like 20-29 or 0,3,5, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError(f"expected layers like 20-29 or 0,3,5, got {text!r}")
    return sorted(set(layers))


def count(text: str) -> int:
    """A non-negative integer (argparse type)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "graph",
        help="draw the flow graph of one prompt (forward contributions and their gradients) as a page",
        description="Run PROMPT (and TARGET) once forward and backward and draw the flow graph at one "
        "position: residual states, attention heads, the memories they read and the top MLP neurons, "
        "each read in the vocabulary, joined by their additive contributions; with --target, the "
        "backward view (gradients through the backward lens, Reversed Attention rows) beside it. "
        "Writes one offline HTML page to --out. With --json or --csv, print the node table instead.",
    )
    parser.add_argument("--prompt", required=True, help='e.g. "The capital city of France is"')
    parser.add_argument("--target", default=None,
                        help='e.g. " Paris": tracked by every node and differentiated for the backward view '
                             "(omit for the forward view of the model's own prediction)")  # fmt: skip
    parser.add_argument("--layers", type=layer_range, default=None, help="layers to draw, e.g. 20-29 (default all)")
    parser.add_argument("--position", type=int, default=-1, help="query position in the prompt (default -1, the last)")
    parser.add_argument("--top-heads", type=count, default=2, help="heads kept per layer (default 2)")
    parser.add_argument("--top-memories", type=count, default=2, help="memories kept per head (default 2)")
    parser.add_argument("--top-neurons", type=count, default=2, help="neurons kept per layer (default 2)")
    parser.add_argument("--rank-by", choices=RANK_BY, default="forward",
                        help="keep components by contribution size (forward) or loss effect (backward, needs --target)")  # fmt: skip
    parser.add_argument("--out", default="out/graph.html", help="the page to write (default out/graph.html)")
    add_model_argument(parser)
    add_format_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from tl_reversed.lens.flow_graph import flow_graph

    out = Path(args.out)
    if not args.format:
        if out.suffix.lower() not in (".html", ".htm"):
            raise CommandError(f"--out {args.out!r} must name an .html file, e.g. out/graph.html")
        writable_folder(out.parent)
    model = load_cli_model(args)
    graph = flow_graph(
        model, args.prompt, args.target, layers=args.layers, position=args.position, top_heads=args.top_heads,
        top_memories=args.top_memories, top_neurons=args.top_neurons, rank_by=args.rank_by,
        backward=args.target is not None,
    )  # fmt: skip
    if args.format:
        print_table(graph.to_dataframe(), args.format)
        return 0
    final = graph.node("final")
    print(f"prompt {args.prompt!r}, position {graph.position} {graph.str_tokens[graph.position]!r}: the model predicts "
          f"{final['top_tokens'][0]!r}; tracking {graph.tracked!r} (rank {final['rank']}, p {final['prob']:.3f})")  # fmt: skip
    frame = graph.to_dataframe()
    resid = frame[frame.kind == "resid_post"][["layer", "top_tokens", "rank", "prob"]]
    resid = resid.assign(top_tokens=resid.top_tokens.map(lambda t: repr(t[0])))
    print(f"\nlogit lens after each layer (rank and p of {graph.tracked!r})")
    print(resid.to_string(index=False))
    graph.to_html(out)
    print(f"\nwrote {out} ({len(graph)} nodes)")
    return 0
