"""Forwards that start at a layer from a batch's cached, unpatched residual stream.

A causal-mediation sweep patches one layer at a time; everything before that layer is
the unpatched run, the same for every head of the layer. :class:`Resume` runs the
unpatched batch once, keeps what enters each block, and then runs patched copies of the
batch from any layer on, unembedding each row's last prompt token alone. The blocks
before the layer are skipped, so a sweep over ``n`` layers runs about ``n / 2`` blocks
per patched forward instead of ``n``.

* **HookedTransformer**: each block's ``hook_resid_pre``, and ``start_at_layer``.
* **TransformerBridge** (TransformerLens 4.x): its ``start_at_layer`` still runs the
  blocks before the layer, so :class:`Resume` replays the blocks itself. A forward
  pre-hook on each block (removed before :meth:`Resume.capture` returns) keeps the
  positional and keyword arguments the Hugging Face model gave it (hidden states,
  attention masks, rotary ``position_embeddings``: per layer, so Gemma 3's local and
  global layers keep their own); a resumed forward calls the blocks from the layer on
  with those arguments, the hidden states replaced, then the final norm and the
  unembedding. Copies of the batch (``copies``) repeat every argument whose first
  axis is the batch. TransformerLens hooks inside the blocks (``hook_z``...) fire as
  in a full forward.

Replaying the blocks relies on the Hugging Face model passing each block everything it
needs, which holds for the decoder-only architectures we load but is not a contract: so
:meth:`Resume.capture` checks on the bridge that a resumed, unpatched forward of two
copies from layer 0 gives the full forward's logits (to float rounding), and sets
:attr:`Resume.ok` to ``False`` where it does not; callers then run full forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_reversed.core.architecture import Model, ModelSpec, block_hook, hooks_at_unembed
from tl_reversed.core.engine import Hook, at_last, forward_last, last_position_hook
from tl_reversed.core.inputs import Batch

_CACHE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past")
"""Keyword arguments of a Hugging Face block that carry a KV cache: dropped when a block is replayed."""


class Resume:
    """The unpatched inputs of every block for one batch, and forwards that start at a layer.

    Build it with :meth:`capture`; :meth:`last_logits` then gives the logits at each
    row's last prompt token of ``copies`` stacked copies of the batch run from
    ``layer`` on, with the caller's hooks on (copy ``j`` is rows ``j * b .. j * b + b``).
    """

    def __init__(self, model: Model, spec: ModelSpec, batch: Batch, inputs: list[tuple[tuple, dict]], base: Tensor):
        self.model, self.spec, self.batch = model, spec, batch
        self.inputs = inputs
        self.base = base
        self.ok = True

    @classmethod
    def capture(cls, model: Model, spec: ModelSpec, batch: Batch) -> Resume:
        """Run ``batch`` once, unpatched, keeping what enters each block (and check replay on a bridge)."""
        if spec.kind == "hooked":
            store: dict[int, Tensor] = {}

            def keep(layer: int) -> Hook:
                def hook(x: Tensor, hook: object) -> None:
                    store[layer] = x.detach().clone()

                return block_hook(layer, "resid_pre"), hook

            base = forward_last(model, batch, [keep(layer) for layer in range(spec.n_layers)])
            inputs = [((store[layer],), {}) for layer in range(spec.n_layers)]
            return cls(model, spec, batch, inputs, base)
        kept: dict[int, tuple[tuple, dict]] = {}
        handles = []

        def pre(layer: int):
            def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                kept[layer] = (_detach(args), _detach(kwargs))

            return hook

        try:
            for layer, block in enumerate(model.blocks):  # type: ignore[attr-defined]
                handles.append(block.register_forward_pre_hook(pre(layer), with_kwargs=True))
            base = forward_last(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        resume = cls(model, spec, batch, [kept[layer] for layer in range(spec.n_layers)], base)
        resume.ok = resume._replays()
        return resume

    def _replays(self) -> bool:
        """Whether two unpatched copies resumed from layer 0 give the full forward's logits."""
        try:
            again = self.last_logits(0, 2, [])
        except Exception:  # noqa: BLE001 - any failure means: use full forwards
            return False
        want = self.base.repeat(2, 1)
        full_precision = _dtype(self.model) in (torch.float32, torch.float64)
        tol = (1e-4 if full_precision else 3e-2) * float(want.abs().max()) + 1e-6  # rounding of other batch shapes
        return bool(torch.isfinite(again).all()) and float((again - want).abs().max()) <= tol

    def last_logits(self, layer: int, copies: int, hooks: Sequence[Hook]) -> Float[Tensor, "rows d_vocab"]:
        """Logits at the last prompt token of ``copies`` copies of the batch run from ``layer`` with ``hooks`` on.

        Float32 on the CPU, rows in copy order, like :func:`~tl_reversed.core.engine.forward_last`
        of the stacked batch.
        """
        b = len(self.batch)
        last = self.batch.last.repeat(copies)
        if self.spec.kind == "hooked":
            resid = self.inputs[layer][0][0].repeat(copies, *([1] * (self.inputs[layer][0][0].dim() - 1)))
            only_last = last_position_hook(self.model, last, beside=hooks)
            with torch.no_grad(), self.model.hooks(fwd_hooks=[*hooks, *([only_last] if only_last else [])]):  # type: ignore[operator]
                logits = self.model(resid, start_at_layer=layer)
            return at_last(logits, last)
        args, kwargs = self.inputs[layer]
        hidden = _stack(args[0] if args else kwargs["hidden_states"], b, copies)
        with torch.no_grad(), self.model.hooks(fwd_hooks=list(hooks)):  # type: ignore[operator]
            for at in range(layer, self.spec.n_layers):
                args, kwargs = self.inputs[at]
                rest = {k: (None if k in _CACHE_KWARGS else _stack(v, b, copies)) for k, v in kwargs.items()}
                if args:
                    out = self.model.blocks[at](hidden, *_stack(args[1:], b, copies), **rest)  # type: ignore[attr-defined]
                else:
                    out = self.model.blocks[at](**{**rest, "hidden_states": hidden})  # type: ignore[attr-defined]
                hidden = out[0] if isinstance(out, tuple) else out
            if hooks_at_unembed([name for name, _ in hooks]):
                return at_last(self.model.unembed(self.model.ln_final(hidden)), last)  # type: ignore[attr-defined]
            resid = hidden[torch.arange(len(last), device=hidden.device), last.to(hidden.device)][:, None]
            return at_last(self.model.unembed(self.model.ln_final(resid)), last)  # type: ignore[attr-defined]


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _stack(value: Any, b: int, copies: int) -> Any:
    """``copies`` copies of every tensor in ``value`` whose first axis is the batch (``b`` rows, rank >= 2)."""
    if copies == 1:
        return value
    if isinstance(value, Tensor):
        if value.dim() >= 2 and value.shape[0] == b:
            return value.repeat(copies, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, tuple):
        return tuple(_stack(v, b, copies) for v in value)
    if isinstance(value, list):
        return [_stack(v, b, copies) for v in value]
    return value


def _dtype(model: Model) -> torch.dtype:
    return next(model.parameters()).dtype
