"""B1 overhead: Reversed Attention (norms) against a plain forward and backward pass.

Workload: 16 five-shot ``capitalize`` ICL prompts with their targets, one batch.

* plain: ``model(tokens)``, the same per-example target cross-entropy, ``backward()``
  to the embeddings; no hooks at all (the embedding matrix is the only tensor that
  requires grad, so the backward pass reaches the embeddings and no other weight).
  It unembeds every position, as a plain call does.
* ra: the user-facing call ``reversed_attention(model, prompts, targets, keep="norms")``,
  everything included (tokenizing, hooks, restoring the model, the result object).
  Its loss reads the target positions alone, so it unembeds those alone.
* leaf: for the breakdown, the pass ``reversed_attention`` makes with only its
  embedding hook and the target-positions unembedding, none of the per-layer hooks.

Target: ``ra / plain <= 1.3``. ``ra / leaf`` is the cost of RA's own hooks.
"""

from __future__ import annotations

import torch

from benchmarks.common import Context, Row, interleaved, row


def _embedding_weight(model) -> torch.nn.Parameter:
    embed = model.embed
    original = getattr(embed, "original_component", None)
    return original.weight if original is not None else embed.W_E


def plain_pass(model, batch, metric=None) -> None:
    """Forward plus backward to the embeddings, no hooks, no parameter gradient but W_E's.

    ``batch`` is a :class:`tl_reversed.core.inputs.Batch` (loss: its targets' cross-entropy),
    or a token tensor with a ``metric(logits, tokens) -> [batch]`` loss.
    """
    from tl_reversed.core.inputs import target_loss

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    weight = _embedding_weight(model)
    try:
        for p in params:
            p.requires_grad_(False)
        weight.requires_grad_(True)
        with torch.enable_grad():
            if metric is None:
                loss = target_loss(model(batch.tokens.to(weight.device)), batch)
            else:
                loss = metric(model(batch), batch)
            loss.sum().backward()
    finally:
        weight.grad = None
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def run(ctx: Context) -> list[Row]:
    from tl_reversed import reversed_attention
    from tl_reversed.core.architecture import describe
    from tl_reversed.core.engine import forward_backward
    from tl_reversed.core.inputs import tokenize
    from tl_reversed.core.state import untouched

    model = ctx.model()
    n = 4 if ctx.tiny else 16
    examples = ctx.examples(n, shots=5)
    prompts, targets = list(examples.prompts), list(examples.targets)
    batch = tokenize(model, prompts, targets, describe(model), need_targets=True)

    def ra():
        reversed_attention(model, prompts, targets, keep="norms", batch_size=n, progress=False)

    def leaf():
        with untouched(model):
            forward_backward(model, batch, None)

    t = interleaved(ctx, {"plain": lambda: plain_pass(model, batch), "ra": ra, "leaf": leaf})
    plain, ra_s, leaf_s = t["plain"]["median"], t["ra"]["median"], t["leaf"]["median"]
    shape = f"{n} prompts x {batch.tokens.shape[1]} tokens"
    return [
        row("B1", "plain forward+backward to embeddings", plain, "s", note=shape, times=t["plain"]["times"]),
        row("B1", "reversed_attention(keep='norms')", ra_s, "s", note=shape, times=t["ra"]["times"]),
        row(
            "B1",
            "overhead: RA / plain",
            ra_s / plain,
            "x",
            "<= 1.3",
            note=f"RA unembeds the target positions alone, the plain pass every position; RA's pass without its per-layer hooks: {leaf_s / plain:.2f}x",
            leaf_s=leaf_s,
            leaf_times=t["leaf"]["times"],
            tokens=list(batch.tokens.shape),
        ),
        row(
            "B1",
            "RA's hooks: RA / the same pass without them",
            ra_s / leaf_s,
            "x",
            note=f"pass with the embedding hook and target-positions unembedding alone: {leaf_s:.3g} s",
        ),
    ]
