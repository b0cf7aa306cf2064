"""``tl-reversed heads``: the top heads by RA norm for one prompt and target."""

from __future__ import annotations

import argparse

from tl_reversed.commands.common import (
    add_format_argument,
    add_model_argument,
    load_cli_model,
    positive_int,
    predicted_next,
    print_table,
)
from tl_reversed.core.options import RA_PATHS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "heads",
        help="print the top heads by Reversed Attention norm",
        description="Print the heads whose attention gradient descent most wants to change for "
        "PROMPT -> TARGET, each with the query row that dominates its RA map and the key tokens "
        "that row pushes up (a descent step attends to them more) and down. With --json or --csv, "
        "print every head's RA and forward-attention norm instead (one row per head).",
    )
    parser.add_argument("--prompt", required=True, help='e.g. "The capital city of France is"')
    parser.add_argument("--target", required=True, help='e.g. " Paris" (mind the leading space)')
    parser.add_argument("--top", type=positive_int, default=10, help="number of heads to print (default 10)")
    parser.add_argument(
        "--path", choices=RA_PATHS, default="auto",
        help="which pass computes RA: auto (the memory-bounded one for long prompts, default), standard or bounded",
    )  # fmt: skip
    add_model_argument(parser)
    add_format_argument(parser)
    return parser


def format_heads(result, top: int) -> str:
    """A fixed-width table of the top heads of a one-example result."""
    rows = [f"{'rank':>4}  {'head':<7} {'RA norm':>9} {'FA norm':>8}  {'query row':<16} pushed up / pushed down"]
    for rank, (layer, head) in enumerate(result.top_heads(top), start=1):
        info = result.describe_head(layer, head)
        fa = float(result.pattern_norms[0, result.layers.index(layer), head])
        up = ", ".join(repr(t) for t, _ in info["pushed_up"]) or "-"
        down = ", ".join(repr(t) for t, _ in info["pushed_down"]) or "-"
        query = f"{info['query_pos']}:{info['query_token']!r}"
        label = f"L{layer}H{head}"
        rows.append(f"{rank:>4}  {label:<7} {info['ra_norm']:>9.4f} {fa:>8.3f}  {query:<16} up {up} | down {down}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    from tl_reversed import reversed_attention

    model = load_cli_model(args)
    result = reversed_attention(model, args.prompt, args.target, keep="norms" if args.format else "maps", path=args.path)
    if args.format:
        print_table(result.to_dataframe(), args.format)
        return 0
    prediction = predicted_next(model, args.prompt)
    print(f"prompt {args.prompt!r} -> target {args.target!r}: loss {float(result.loss[0]):.3f}, model predicts {prediction!r}")
    print(format_heads(result, args.top))
    return 0
