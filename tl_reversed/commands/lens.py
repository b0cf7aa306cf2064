"""``tl-reversed lens``: the backward lens grid for one prompt and target."""

from __future__ import annotations

import argparse
from pathlib import Path

from tl_reversed.commands.common import add_model_argument

SITES = ("mlp_out", "attn_out")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "lens",
        help="print and draw the backward lens: what each layer's gradient pushes toward",
        description="Backpropagate the cross-entropy of TARGET after PROMPT and read each layer's "
        "gradient (VJP) at mlp_out and attn_out through the final norm and the unembedding. "
        "Prints, for every layer and position, the token a gradient-descent step pushes that "
        "output toward (the top token of -VJP), and writes the layer x position figure "
        "(colour = VJP norm) and an HTML page to --out.",
    )
    parser.add_argument("--prompt", required=True, help='e.g. "The capital city of France is"')
    parser.add_argument("--target", required=True, help='e.g. " Rome" (mind the leading space)')
    parser.add_argument(
        "--site", action="append", choices=("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"),
        help="site to read (repeat for several; default mlp_out and attn_out)",
    )  # fmt: skip
    parser.add_argument(
        "--projection", choices=("weight", "jacobian"), default="weight",
        help="weight: final-norm gain then W_U (default); jacobian: the final norm's linearisation per position",
    )  # fmt: skip
    parser.add_argument("--out", default="out/lens", help="folder for backward_lens.png and .html (default out/lens)")
    add_model_argument(parser)
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
    from tl_reversed import load_model
    from tl_reversed.lens.backward_lens import backward_lens

    model = load_model(args.model, device=args.device)
    sites = tuple(dict.fromkeys(args.site)) if args.site else SITES
    lens = backward_lens(model, args.prompt, args.target, sites=sites, heads=False, projection=args.projection)
    tokens = lens.tokens[:, : int(lens.lengths[0])]
    prediction = model.to_string(model(tokens.to(next(model.parameters()).device))[0, -1].argmax())
    print(
        f"prompt {args.prompt!r} -> target {args.target!r}: loss {float(lens.loss[0]):.3f}, "
        f"model predicts {prediction!r}"
    )
    print("cells: the token a gradient-descent step pushes each output toward (top token of -VJP)")
    for site in lens.sites:
        print(f"\n{site}")
        print(format_grid(lens, site))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = lens.plot()
    figure.savefig(out / "backward_lens.png", dpi=120)
    lens.to_html(out / "backward_lens.html")
    print(f"\nwrote {out / 'backward_lens.png'} and {out / 'backward_lens.html'}")
    return 0
