"""``tl-reversed heads``: the top heads by RA norm for one prompt and target."""

from __future__ import annotations

import argparse

from tl_reversed.commands.common import add_model_argument


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "heads",
        help="print the top heads by Reversed Attention norm",
        description="Print the heads whose attention gradient descent most wants to change for "
        "PROMPT -> TARGET, each with the query row that dominates its RA map and the key tokens "
        "that row pushes up (a descent step attends to them more) and down.",
    )
    parser.add_argument("--prompt", required=True, help='e.g. "The capital city of France is"')
    parser.add_argument("--target", required=True, help='e.g. " Paris" (mind the leading space)')
    parser.add_argument("--top", type=int, default=10, help="number of heads to print (default 10)")
    add_model_argument(parser)
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
    from tl_reversed import load_model, reversed_attention

    model = load_model(args.model, device=args.device)
    result = reversed_attention(model, args.prompt, args.target)
    prediction = model.to_string(model(result.tokens[:, : int(result.lengths[0])])[0, -1].argmax())
    print(f"prompt {args.prompt!r} -> target {args.target!r}: loss {float(result.loss[0]):.3f}, model predicts {prediction!r}")
    print(format_heads(result, args.top))
    return 0
