"""``tl-reversed lens``: the backward lens grid for one prompt and target."""

from __future__ import annotations

import argparse

from tl_reversed.commands.common import (
    add_format_argument,
    add_model_argument,
    load_cli_model,
    predicted_next,
    print_table,
    writable_folder,
)
from tl_reversed.core.options import PROJECTIONS, SITES as ALL_SITES

SITES = ("mlp_out", "attn_out")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "lens",
        help="print and draw the backward lens: what each layer's gradient pushes toward",
        description="Backpropagate the cross-entropy of TARGET after PROMPT and read each layer's "
        "gradient (VJP) at mlp_out and attn_out through the final norm and the unembedding. "
        "Prints, for every layer and position, the token a gradient-descent step pushes that "
        "output toward (the top token of -VJP), and writes the layer x position figure "
        "(colour = VJP norm) and an HTML page to --out. With --json or --csv, print the lens table "
        "instead (one row per site, layer and position) and write no files.",
    )
    parser.add_argument("--prompt", required=True, help='e.g. "The capital city of France is"')
    parser.add_argument("--target", required=True, help='e.g. " Rome" (mind the leading space)')
    parser.add_argument(
        "--site", action="append", choices=ALL_SITES,
        help="site to read (repeat for several; default mlp_out and attn_out)",
    )  # fmt: skip
    parser.add_argument(
        "--projection", choices=PROJECTIONS, default="weight",
        help="weight: final-norm gain then W_U (default); jacobian: the final norm's linearisation per position",
    )  # fmt: skip
    parser.add_argument("--out", default="out/lens", help="folder for backward_lens.png and .html (default out/lens)")
    add_model_argument(parser)
    add_format_argument(parser)
    return parser


def format_grid(lens, site: str) -> str:
    """The layer x position table of top pushed-toward tokens, last layer first, with norms."""
    grid = lens.grid(site)
    ranks = lens.target_ranks(site) if lens.top.target_rank is not None else None
    cells = grid.map(repr)
    if ranks is not None:
        cells.insert(len(cells.columns), "target rank (last pos)", [ranks[layer] for layer in grid.index])
    s = lens.sites.index(site)
    cells.insert(len(cells.columns), "norm (last pos)", [f"{float(lens.norms[0, s, j, int(lens.lengths[0]) - 1]):.4f}"
                                                         for j in range(len(lens.layers))])  # fmt: skip
    return cells.iloc[::-1].to_string()


def run(args: argparse.Namespace) -> int:
    from tl_reversed.lens.backward_lens import backward_lens

    out = None if args.format else writable_folder(args.out)
    model = load_cli_model(args)
    sites = tuple(dict.fromkeys(args.site)) if args.site else SITES
    lens = backward_lens(model, args.prompt, args.target, sites=sites, heads=False, projection=args.projection)
    if args.format:
        print_table(lens.to_dataframe(), args.format)
        return 0
    prediction = predicted_next(model, args.prompt)
    print(
        f"prompt {args.prompt!r} -> target {args.target!r}: loss {float(lens.loss[0]):.3f}, "
        f"model predicts {prediction!r}"
    )
    print("cells: the token a gradient-descent step pushes each output toward (top token of -VJP)")
    for site in lens.sites:
        print(f"\n{site}")
        print(format_grid(lens, site))
    figure = lens.plot()
    figure.savefig(out / "backward_lens.png", dpi=120)
    lens.to_html(out / "backward_lens.html")
    print(f"\nwrote {out / 'backward_lens.png'} and {out / 'backward_lens.html'}")
    return 0
