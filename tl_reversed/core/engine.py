"""The pass engine: run a model over a batch in chunks and feed what each *sink* asks for.

Every method of the package is one or more passes of the same shape::

    with untouched(model):                       # parameters frozen, state restored after
        for chunk in batch.chunks(batch_size):   # one chunking rule for every caller
            hooks = every sink's hooks for this chunk
            forward (and backward of the summed per-example loss), hooks on
            every backward hook's gradient checked for NaN/inf, once, here
            every sink merges the chunk into its rows of the whole batch
    results = [sink.finish() for sink in sinks]

A *sink* (:class:`Sink`) is one quantity: RA maps or norms, lens projections, cached
activations, answers at the last prompt token, averaged maps, a causal-mediation
sweep. It declares its hooks for a chunk, merges the chunk into its buffers (scattered
into example order by ``chunk.index``) and finishes into a result. A new per-head
quantity is a new sink, not a new loop.

The parameters are frozen (see :mod:`tl_reversed.core.state`), so the backward pass starts
from the embeddings: a forward hook on ``hook_embed`` returns a detached copy that
requires grad. Backward hooks (``hook_z`` and friends) then receive the gradient of
the per-example loss, and no parameter gradient is ever computed or stored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_reversed.core.architecture import EMBED, UNEMBED_IN, Model, hooks_at_unembed
from tl_reversed.core.inputs import Batch, target_loss, target_positions
from tl_reversed.core.options import show_progress
from tl_reversed.core.state import untouched

Metric = Callable[[Float[Tensor, "batch pos vocab"], Int[Tensor, "batch pos"]], Float[Tensor, " batch"]]
"""A loss to differentiate: logits and input tokens in, one loss per example out."""

Hook = tuple[str, Callable]
"""A hook as TransformerLens takes it: ``(hook_name, fn(tensor, hook))``."""


def model_device(model: Model) -> torch.device:
    """The device the model takes its tokens on: its embedding's (the first parameter's where it has none).

    A model split across devices (a TransformerBridge loaded with ``device_map`` or
    ``n_devices``: accelerate places each block, and moves activations between them) has
    no one device: hooks see each layer's tensors on that layer's device, the logits come
    out on :func:`output_device`. Sinks work on the device of the tensors they are given
    and gather their results on the CPU.
    """
    embed = getattr(model, "embed", None)
    first = next(embed.parameters(), None) if isinstance(embed, torch.nn.Module) else None
    return (first if first is not None else next(model.parameters())).device


def output_device(model: Model) -> torch.device:
    """The device of the unembedding (where the logits come out; the last block's on a split model)."""
    unembed = getattr(model, "unembed", None)
    last = next(unembed.parameters(), None) if isinstance(unembed, torch.nn.Module) else None
    return (last if last is not None else next(model.parameters())).device


def model_devices(model: Model) -> list[torch.device]:
    """Every device holding some of the model's parameters (one, unless the model is split)."""
    return sorted({p.device for p in model.parameters()}, key=str)


@dataclass
class Chunk:
    """One mini-batch of a pass, as the sinks see it.

    Attributes:
        index: the rows of the whole batch this chunk holds (scatter results there).
        batch: those rows, trimmed to their longest.
        loss: the per-example loss (after the backward of a backward pass).
        logits: the logits at each row's last prompt token (forward-only passes).
    """

    index: Int[Tensor, " rows"]
    batch: Batch
    loss: Float[Tensor, " rows"] | None = None
    logits: Float[Tensor, "rows d_vocab"] | None = None


@runtime_checkable
class Sink(Protocol):
    """One quantity collected over a pass.

    ``hooks(chunk)`` returns the forward and backward hooks for one chunk (fresh closures
    per chunk); after the chunk's pass, ``merge(chunk)`` moves what they saw into the
    sink's rows ``chunk.index``; ``finish()`` returns the result.
    """

    def hooks(self, chunk: Chunk) -> tuple[Sequence[Hook], Sequence[Hook]]: ...

    def merge(self, chunk: Chunk) -> None: ...

    def finish(self) -> Any: ...


class _FiniteCheck:
    """Wraps backward hooks so every gradient a sink receives is checked for NaN/inf once."""

    def __init__(self) -> None:
        self.bad: list[str] = []

    def wrap(self, name: str, fn: Callable) -> Hook:
        def hook(grad: Tensor, hook: object) -> object:
            if not bool(torch.isfinite(grad).all()):
                self.bad.append(name)
            return fn(grad, hook)

        return name, hook

    def raise_if_bad(self) -> None:
        if self.bad:
            raise FloatingPointError(
                f"the gradient at {self.bad[0]} has NaN or inf entries: the model overflowed in its dtype; "
                "run it in float32 (load_model(..., dtype=torch.float32)) or shorten the prompt"
            )


def run(
    model: Model,
    batch: Batch,
    sinks: Sequence[Sink],
    *,
    metric: Metric | None = None,
    backward: bool = True,
    batch_size: int | None = 16,
    extra_hooks: Sequence[Hook] = (),
    progress: bool | None = None,
    desc: str = "pass",
    same_length: bool | None = None,
) -> Float[Tensor, " batch"] | None:
    """Run ``model`` over ``batch`` in chunks inside the state guard, feeding ``sinks``.

    Args:
        model: a TransformerBridge (compatibility mode) or HookedTransformer.
        batch: the inputs (:func:`tl_reversed.core.inputs.tokenize`).
        sinks: what to collect; each is merged chunk by chunk, in example order.
        metric: the per-example loss of a backward pass (default: the target cross-entropy).
            Rows of one length are batched together so the metric never sees padding.
        backward: ``True``: forward and backward of the summed per-example loss, and
            the per-example loss is returned. ``False``: a forward pass under ``no_grad``
            that unembeds the last prompt token alone; the sinks get its logits
            (``chunk.logits``) and ``None`` is returned.
        batch_size: examples per chunk (``None``: all at once); see :meth:`Batch.chunks`.
        extra_hooks: forward hooks that change the computation (an attention patch, an
            ablation); they run before the sinks' hooks on the same hook points.
        progress: show a progress bar; ``None`` (default) shows one when there is more
            than one chunk (:func:`tl_reversed.core.options.show_progress`).
        desc: the progress bar's label.
        same_length: never put rows of different lengths in one chunk; ``None`` (default):
            for a backward pass with a ``metric``. ``False`` for a metric that reads each
            row's own positions and so never sees padding (e.g. ``p(target)`` at ``batch.last``).
    """
    if same_length is None:
        same_length = backward and metric is not None
    parts = batch.chunks(batch_size, same_length=same_length)
    show = show_progress(progress, len(parts))
    loss: Tensor | None = None
    with untouched(model):
        for rows in tqdm(parts, desc=desc, disable=not show, leave=False):
            chunk = Chunk(index=torch.tensor(rows, dtype=torch.long), batch=batch.rows(rows))
            fwd: list[Hook] = []
            bwd: list[Hook] = []
            check = _FiniteCheck()
            for sink in sinks:
                f, b = sink.hooks(chunk)
                fwd += f
                bwd += [check.wrap(name, fn) for name, fn in b]
            if backward:
                chunk.loss = forward_backward(model, chunk.batch, metric, fwd, bwd, extra_hooks)
                check.raise_if_bad()
                if loss is None:
                    loss = torch.zeros(len(batch), dtype=chunk.loss.dtype)
                loss[chunk.index] = chunk.loss
            else:
                chunk.logits = forward_last(model, chunk.batch, [*extra_hooks, *fwd])
            for sink in sinks:
                sink.merge(chunk)
    return loss


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
    model: Model,
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
    are unembedded (:func:`positions_hook`, added after every
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


def forward_last(model: Model, batch: Batch, hooks: Sequence[Hook] = ()) -> Float[Tensor, "batch d_vocab"]:
    """Logits at each row's last prompt token (``batch.last``) with ``hooks`` on, float32 on the CPU.

    Runs under ``torch.no_grad`` and unembeds the last prompt token alone (added after
    the caller's hooks), unless a caller's hook reads the unembedding's input or output.
    """
    only_last = last_position_hook(model, batch.last, beside=hooks)
    with torch.no_grad(), model.hooks(fwd_hooks=[*hooks, *([only_last] if only_last else [])]):  # type: ignore[operator]
        logits = model(batch.tokens.to(model_device(model)))
    return at_last(logits, batch.last)


def at_last(
    logits: Float[Tensor, "batch pos d_vocab"], last: Int[Tensor, " batch"]
) -> Float[Tensor, "batch d_vocab"]:
    """Row ``i``'s logits at position ``last[i]``, float32 on the CPU (logits of one position are that position's)."""
    if logits.shape[1] == 1:
        return logits[:, 0].float().cpu()
    return logits[torch.arange(len(last), device=logits.device), last.to(logits.device)].float().cpu()


# --------------------------------------------------------------------------- unembedding some positions


def positions_hook(
    model: object, cols: torch.Tensor, rows: torch.Tensor | None = None, *, beside: Sequence[tuple] = ()
) -> tuple[str, object] | None:
    """A forward hook that unembeds only positions ``(rows[i], cols[i])``.

    With it on, the model returns logits ``[n, 1, d_vocab]`` for those ``n`` positions
    instead of ``[batch, pos, d_vocab]``: on a 135M-parameter model with a 49k vocabulary
    the unembedding is about a fifth of a forward pass (and of a backward one), and a
    loss or an answer reads a few positions. ``rows=None`` means one position per row,
    ``cols[i]`` in row ``i``. Both may be replaced between calls through ``hook.cols`` and
    ``hook.rows`` (a mini-batch loop reuses one hook).

    ``None`` (run without it and index the full logits) where the model has no such hook
    point, or where one of the hooks it runs ``beside`` (``(name, fn)`` pairs) would see
    what it trims (see :func:`hooks_at_unembed`).
    """
    if UNEMBED_IN not in getattr(model, "hook_dict", {}) or hooks_at_unembed([name for name, _ in beside]):
        return None

    keep = KeepPositions(cols, rows)
    return UNEMBED_IN, keep


class KeepPositions:
    """The hook of :func:`positions_hook`: keeps positions ``(rows[i], cols[i])`` of the unembedding's input.

    ``cols`` and ``rows`` may be replaced between calls (a mini-batch loop reuses one hook).
    """

    def __init__(self, cols: torch.Tensor, rows: torch.Tensor | None = None):
        self.cols, self.rows = cols, rows

    def __call__(self, x: torch.Tensor, hook: object) -> torch.Tensor:
        cols = self.cols.to(x.device)
        rows = torch.arange(x.shape[0], device=x.device) if self.rows is None else self.rows.to(x.device)
        return x[rows, cols][:, None]


def last_position_hook(model: object, last: torch.Tensor, *, beside: Sequence[tuple] = ()) -> tuple[str, object] | None:
    """:func:`positions_hook` for position ``last[i]`` of each row ``i``: logits ``[batch, 1, d_vocab]``."""
    return positions_hook(model, last, beside=beside)

