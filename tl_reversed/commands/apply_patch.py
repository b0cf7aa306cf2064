"""``tl-reversed apply-patch``: apply a saved structured attention patch to prompts.

Loads a :class:`~tl_reversed.experiments.structured_patch.StructuredPatch` (written by
``tl-reversed patching ... --save patch.safetensors`` or ``StructuredPatch.save``) and
prints, for each ``--prompt``, the model's top next tokens without and with the patch.
"""

from __future__ import annotations

import argparse

from tl_reversed.commands.common import CommandError, add_format_argument, add_model_argument, load_cli_model, positive_int, print_table


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "apply-patch",
        help="apply a saved structured attention patch and print the patched and unpatched top tokens",
        description="Load a structured attention patch (tl-reversed patching ... --save PATCH) and, for each "
        "--prompt (any length, in the patch's prompt format, e.g. 'Q: hello\\nA:'), print the model's top "
        "next tokens without the patch and with it.",
    )
    parser.add_argument("--patch", required=True, help="the patch file (.safetensors)")
    parser.add_argument("--prompt", required=True, action="append", help="a prompt; repeat for several")
    parser.add_argument("--lr", type=float, default=None, help="the patch's factor (default: the one saved in the patch)")
    parser.add_argument("--top-k-heads", type=float, default=None,
                        help="patch only the top heads by norm: a fraction in (0, 1] or a number of heads")  # fmt: skip
    parser.add_argument("--top", type=positive_int, default=5, help="top tokens to print (default 5)")
    add_format_argument(parser)
    add_model_argument(parser)
    return parser


def top_tokens(model, prompts: list[str], patch, lr: float | None, top_k_heads: float | None, top: int):
    """One row per (prompt, patched, rank): token and probability at each prompt's last token."""
    import pandas as pd
    import torch

    k = None if top_k_heads is None else (int(top_k_heads) if top_k_heads >= 1 else float(top_k_heads))
    lengths = [int(model.to_tokens(p).shape[-1]) for p in prompts]
    tokens = model.to_tokens(prompts).to(next(model.parameters()).device)
    rows = []
    for patched in (False, True):
        hooks = patch.hooks(model, prompts, lr=lr, top_k=k) if patched else []
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        for i, (prompt, n) in enumerate(zip(prompts, lengths)):
            probs = logits[i, n - 1].float().softmax(-1)
            values, ids = probs.topk(top)
            for rank, (p, t) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
                rows.append({"prompt": prompt, "patched": patched, "rank": rank, "token": model.to_string(t), "prob": p})
    return pd.DataFrame(rows)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tl_reversed.experiments.structured_patch import StructuredPatch

    if not Path(args.patch).is_file():
        raise CommandError(f"--patch {args.patch!r}: no such file; write one with tl-reversed patching ... --save PATCH")
    patch = StructuredPatch.load(args.patch)
    model = load_cli_model(args)
    table = top_tokens(model, args.prompt, patch, args.lr, args.top_k_heads, args.top)
    if args.format:
        print_table(table, args.format)
        return 0
    lr = patch.lr if args.lr is None else args.lr
    print(f"patch {args.patch}: {patch.source.upper()} of {patch.n_examples} prompts, lr {lr:g}")
    for prompt in args.prompt:
        print(f"\nprompt {prompt!r}")
        for patched in (False, True):
            part = table[(table.prompt == prompt) & (table.patched == patched)]
            shown = ", ".join(f"{t!r} {p:.3f}" for t, p in zip(part.token, part.prob))
            print(f"  {'patched  ' if patched else 'unpatched'}: {shown}")
    return 0
