"""One forward and one backward pass with hooks: the machinery every method shares.

The parameters are frozen (see :mod:`tl_reversed.core.state`), so the backward pass starts
from the embeddings: a forward hook on ``hook_embed`` returns a detached copy that
requires grad. Backward hooks (``hook_z`` and friends) then receive the gradient of
the per-example loss, and no parameter gradient is ever computed or stored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_reversed.core.architecture import EMBED, positions_hook
from tl_reversed.core.checks import optional_batch_size
from tl_reversed.core.inputs import Batch, target_loss, target_positions

Metric = Callable[[Float[Tensor, "batch pos vocab"], Int[Tensor, "batch pos"]], Float[Tensor, " batch"]]
"""A loss to differentiate: logits and input tokens in, one loss per example out."""

Hook = tuple[str, Callable]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def _embed_leaf(x: Tensor, hook: object) -> Tensor:
    return x.detach().requires_grad_(True)


def per_example_loss(logits: Tensor, batch: Batch, metric: Metric | None, *, picked: bool = False) -> Float[Tensor, " batch"]:
    """The default target cross-entropy, or the user's metric checked for shape.

    ``picked``: the logits are those of the target positions alone (see :func:`forward_backward`).
    """
    if metric is None:
        return target_loss(logits, batch, picked=picked)
    loss = metric(logits, batch.tokens.to(logits.device))
    if not isinstance(loss, Tensor):
        raise TypeError(f"metric must return a tensor of per-example losses, got {type(loss).__name__}")
    if loss.ndim == 0 and len(batch) == 1:
        loss = loss[None]
    if loss.shape != (len(batch),):
        raise ValueError(
            f"metric returned shape {tuple(loss.shape)} for a batch of {len(batch)}: it must return one "
            "loss per example (shape [batch]); do not average over the batch"
        )
    return loss


def forward_backward(
    model: torch.nn.Module,
    batch: Batch,
    metric: Metric | None,
    fwd_hooks: Sequence[Hook] = (),
    bwd_hooks: Sequence[Hook] = (),
    extra_hooks: Sequence[Hook] = (),
) -> Float[Tensor, " batch"]:
    """Run the model on ``batch`` and backpropagate the summed per-example loss.

    ``extra_hooks`` are forward hooks that change the computation (an attention patch);
    they run before ours on the same hook points. Returns the per-example loss.

    The default loss (``metric=None``) reads the target positions alone, so only those
    are unembedded (:func:`tl_reversed.core.architecture.positions_hook`, added after every
    other hook): the same gradients, without the logits of every other position.
    A ``metric``, or a hook on the unembedding's input or output, gets the full logits.
    """
    tokens = batch.tokens.to(model_device(model))
    only_targets = None
    if metric is None:
        rows, cols = target_positions(batch)
        only_targets = positions_hook(model, cols, rows, beside=[*extra_hooks, *fwd_hooks, *bwd_hooks])
    fwd = [(EMBED, _embed_leaf), *extra_hooks, *fwd_hooks, *([only_targets] if only_targets else [])]
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd, bwd_hooks=list(bwd_hooks)):  # type: ignore[operator]
        logits = model(tokens)
        loss = per_example_loss(logits, batch, metric, picked=only_targets is not None)
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"the loss is not finite ({loss.tolist()}): the model overflowed in its dtype; "
                "run it in float32 (load_model(..., dtype=torch.float32))"
            )
        loss.sum().backward()
    return loss.detach().to(torch.float64 if loss.dtype == torch.float64 else torch.float32).cpu()


def chunks(batch: Batch, batch_size: int | None, *, same_length: bool) -> list[list[int]]:
    """Split example indices into mini-batches (of equal length rows when asked)."""
    size = optional_batch_size(batch_size) or len(batch)
    if not same_length:
        order = list(range(len(batch)))
        return [order[i : i + size] for i in range(0, len(order), size)]
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(batch.lengths.tolist()):
        groups.setdefault(length, []).append(i)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]
