"""Pass-engine sinks of the causal-mediation (CM1, CM2) and attribution-patching (AtP) rankings.

The methods themselves are registered in :mod:`tl_reversed.experiments.ranking`; each
runs these sinks through :func:`tl_reversed.core.engine.run`:

* :class:`SweepHeads` (forward only): per chunk, TransformerLens' activation-patching
  sweep over every head (``generic_activation_patch``), summed over examples;
* :class:`MeanZAtLast` (forward only): each head's mean ``hook_z`` at the last prompt token;
* :class:`AttributionPatching` (backward, metric ``p(target)``): ``(z_clean - z_corrupt) . grad``;
* :class:`ZeroAblationAttribution` (backward, beside :class:`~tl_reversed.core.reversed_attention.RASink`
  if wanted): ``sum_pos z . grad``, the first-order estimate of CM1 (``"atp0"``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tl_reversed.core.architecture import Model, ModelSpec, attn_hook
from tl_reversed.core.engine import Chunk, Hook, forward_last, model_device
from tl_reversed.core.inputs import Batch
from tl_reversed.core.resume import Resume
from tl_reversed.experiments.evaluation import target_probs




def _p_target_metric(sub: Batch):
    """``logits -> p(first target token)`` at each row's last prompt token, for one sub-batch."""

    def metric(logits: Tensor) -> Tensor:
        rows = torch.arange(len(sub), device=logits.device)
        return target_probs(logits[rows, sub.last.to(logits.device)], sub)

    return metric


def _sweep_heads(model: Model, tokens: Tensor, cache: dict, metric, setter) -> tuple[Tensor, Tensor]:
    """One TransformerLens activation-patching sweep over every (layer, head).

    Returns the per-example metric ``[layer, head, batch]`` and the unpatched baseline ``[batch]``
    (under TransformerLens 2.x/3.x, whose sweep takes scalar metrics: the batch sums,
    ``[layer, head, 1]`` and ``[1]``).
    """
    import inspect

    from transformer_lens.patching import generic_activation_patch

    with torch.no_grad():
        if "reduce" in inspect.signature(generic_activation_patch).parameters:  # TransformerLens 4.x
            result = generic_activation_patch(
                model,
                tokens,
                cache,
                metric,
                setter,
                "z",
                index_axis_names=["layer", "head"],
                reduce="none",
                baseline=True,
            )
            return result.values.float().cpu(), result.baseline.float().cpu()
        # TransformerLens 2.x/3.x: the metric must be a scalar, so sum over the batch
        summed = generic_activation_patch(
            model, tokens, cache, lambda logits: metric(logits).sum(), setter, "z", index_axis_names=["layer", "head"]
        )
        baseline = metric(model(tokens)).sum()
    return summed.float().cpu()[..., None], baseline.float().cpu()[None]


STACKED_ROWS = 512
"""Most rows of one stacked CM forward (heads x examples); more heads are split over passes."""


def _stacked_sweep(
    model: Model, spec: ModelSpec, sub: Batch, cache: dict, setter: Callable, *, resume: bool = True
) -> Tensor:
    """p(target) with each (layer, head) patched in turn, the heads stacked on the batch axis.

    The rows of ``sub`` are repeated once per head of a group (copy ``j`` holds rows
    ``j * b .. j * b + b``; as many heads per forward as fit in :data:`STACKED_ROWS` rows);
    at the layer's ``hook_z`` the setter patches head ``j`` of copy ``j`` alone. Each
    forward starts at the patched layer from the chunk's cached, unpatched block inputs
    and unembeds the last prompt token alone (:class:`~tl_reversed.core.resume.Resume`:
    ``start_at_layer`` on a HookedTransformer, the blocks replayed on a TransformerBridge,
    whose ``start_at_layer`` still runs the blocks before it in TransformerLens 4.3).
    ``resume=False``, or a bridge whose replay does not reproduce its full forward, runs
    every forward from the embeddings (:func:`~tl_reversed.core.engine.forward_last`).
    Returns ``[layer, head, batch]``.
    """
    b, n_heads = len(sub), spec.n_heads
    per_pass = max(1, min(n_heads, STACKED_ROWS // b))
    out = torch.zeros(spec.n_layers, n_heads, b)
    start = Resume.capture(model, spec, sub) if resume else None
    if start is not None and not start.ok:
        warnings.warn(
            "causal mediation: replaying this model's blocks from a cached residual did not reproduce its "
            "forward pass, so every patched forward runs all layers (same scores, slower)",
            stacklevel=3,
        )
        start = None
    for layer in range(spec.n_layers):
        name = attn_hook(layer, "z")
        for first in range(0, n_heads, per_pass):
            heads = list(range(first, min(first + per_pass, n_heads)))
            stacked = sub.rows([row for _ in heads for row in range(b)])

            def patch(z: Tensor, hook: object, layer: int = layer, name: str = name, heads: list = heads) -> Tensor:
                z = z.clone()
                for j, head in enumerate(heads):
                    part = z[j * b : (j + 1) * b]
                    patched = setter(part, (layer, head), cache[name])
                    if patched is not None and patched is not part:
                        z[j * b : (j + 1) * b] = patched
                return z

            if start is None:
                logits = forward_last(model, stacked, [(name, patch)])
            else:
                logits = start.last_logits(layer, len(heads), [(name, patch)])
            out[layer, heads] = target_probs(logits, stacked).reshape(len(heads), b)
    return out


class SweepHeads:
    """Forward-only sink: each chunk's activation-patching sweep over every head (CM1, CM2).

    ``stacked=True`` (default): per layer, one forward of the chunk's rows repeated once
    per head, each copy with one head patched, starting at that layer from the chunk's cached
    block inputs (``resume=True``, default) or from the embeddings (``resume=False``), and
    unembedding the last prompt token alone (:func:`_stacked_sweep`); the baseline is the
    engine's own unpatched forward of the chunk.
    ``stacked=False``: TransformerLens' sweep (``generic_activation_patch``: one forward per
    head over the chunk, full logits, and its own baseline). Both give the same scores up to
    float rounding (the batch shapes differ; see tests/test_evidence.py).
    ``merge`` sums ``baseline - patched`` (``drop``) or ``patched - baseline`` over the examples.
    """

    def __init__(
        self, model: Model, spec: ModelSpec, cache: dict, setter_for: Callable[[Batch], Callable], *, drop: bool,
        stacked: bool = True, resume: bool = True,
    ):  # fmt: skip
        self.model, self.spec, self.cache, self.setter_for, self.drop = model, spec, cache, setter_for, drop
        self.stacked, self.resume = stacked, resume
        self.total = torch.zeros(spec.n_layers, spec.n_heads)
        self.base, self.n = 0.0, 0

    def hooks(self, chunk: Chunk) -> tuple[list[Hook], list[Hook]]:
        return [], []

    def merge(self, chunk: Chunk) -> None:
        sub = chunk.batch
        if self.stacked:
            assert chunk.logits is not None
            baseline = target_probs(chunk.logits, sub)
            values = _stacked_sweep(self.model, self.spec, sub, self.cache, self.setter_for(sub), resume=self.resume)
        else:
            tokens = sub.tokens.to(model_device(self.model))
            values, baseline = _sweep_heads(self.model, tokens, self.cache, _p_target_metric(sub), self.setter_for(sub))
        self.total += (baseline - values).sum(-1) if self.drop else (values - baseline).sum(-1)
        self.base += float(baseline.sum())
        self.n += len(sub)

    def finish(self) -> tuple[Float[Tensor, "layer head"], float]:
        return self.total / self.n, self.base / self.n


class MeanZAtLast:
    """Forward-only sink: each head's ``hook_z`` at the last prompt token, averaged over the prompts."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.total = torch.zeros(spec.n_layers, spec.n_heads, spec.d_head)
        self.n = 0

    def hooks(self, chunk: Chunk) -> tuple[list[Hook], list[Hook]]:
        last = chunk.batch.last

        def sum_at_last(layer: int):
            def hook(z: Tensor, hook: object) -> None:
                at = last.to(z.device)
                self.total[layer] += z[torch.arange(z.shape[0], device=z.device), at].float().sum(0).cpu()

            return hook

        return [(attn_hook(layer, "z"), sum_at_last(layer)) for layer in range(self.spec.n_layers)], []

    def merge(self, chunk: Chunk) -> None:
        self.n += len(chunk.batch)

    def finish(self) -> Float[Tensor, "layer head d_head"]:
        return self.total / self.n


def _keep(store: dict[int, Tensor], layer: int):
    def hook(x: Tensor, hook: object) -> None:
        store[layer] = x.detach().float().cpu()

    return hook


class AttributionPatching:
    """Backward-pass sink of AtP on the corrupted rows, with its metric ``p(target)``.

    For each chunk of corrupted rows, ``hooks`` first runs the clean rows of the same
    examples forward (keeping ``hook_z``), then hooks ``hook_z`` and its gradient on the
    corrupted pass; ``merge`` adds ``(z_clean - z_corrupt) . grad`` per head. ``metric``
    is ``p(first target token)`` of the chunk the engine is running.
    """

    def __init__(self, model: Model, spec: ModelSpec, clean: Batch, position: str):
        self.model, self.spec, self.clean, self.position = model, spec, clean, position
        self.effect = torch.zeros(spec.n_layers, spec.n_heads)
        self.base, self.n = 0.0, 0
        self._sub: Batch | None = None

    def metric(self, logits: Tensor, tokens: Tensor) -> Tensor:
        assert self._sub is not None
        return _p_target_metric(self._sub)(logits)

    def hooks(self, chunk: Chunk) -> tuple[list[Hook], list[Hook]]:
        layers = range(self.spec.n_layers)
        self._sub, self._clean_sub = chunk.batch, self.clean.rows(chunk.index.tolist())
        self.z_clean: dict[int, Tensor] = {}
        forward_last(self.model, self._clean_sub, [(attn_hook(layer, "z"), _keep(self.z_clean, layer)) for layer in layers])
        self.z_bad: dict[int, Tensor] = {}
        self.grads: dict[int, Tensor] = {}
        fwd = [(attn_hook(layer, "z"), _keep(self.z_bad, layer)) for layer in layers]
        bwd = [(attn_hook(layer, "z"), _keep(self.grads, layer)) for layer in layers]
        return fwd, bwd

    def merge(self, chunk: Chunk) -> None:
        assert chunk.loss is not None
        sub_bad, sub_clean = chunk.batch, self._clean_sub
        self.base += float(chunk.loss.sum())
        self.n += len(sub_bad)
        rows = torch.arange(len(sub_bad))
        for layer in range(self.spec.n_layers):
            grad = self.grads[layer]
            if self.position == "last":
                diff = self.z_clean[layer][rows, sub_clean.last] - self.z_bad[layer][rows, sub_bad.last]
                self.effect[layer] += (diff * grad[rows, sub_bad.last]).sum((0, -1))  # [batch, head, d_head]
            else:
                width = sub_bad.tokens.shape[1]
                self.effect[layer] += ((self.z_clean[layer][:, :width] - self.z_bad[layer]) * grad).sum((0, 1, -1))

    def finish(self) -> tuple[Float[Tensor, "layer head"], float]:
        return self.effect / self.n, self.base / self.n


class ZeroAblationAttribution:
    """Backward-pass sink of ``"atp0"``: the first-order estimate of CM1, ``sum_pos hook_z . grad``.

    Zeroing head ``h`` moves its ``hook_z`` from ``z`` to 0, so to first order the metric
    drops by ``sum over positions and d_head of z * d metric / d z`` (attribution patching
    with a zero baseline). Per example and head; ``finish`` averages over the examples.

    The gradient is that of the pass's per-example loss, turned into ``d p / d z`` by ``of``:

    * ``of="metric"``: the pass differentiates :meth:`metric` (``p(first target token)``
      at the last prompt token, or ``metric(logits, chunk_batch) -> [rows]`` if given), as it is;
    * ``of="nll"``: the pass differentiates the default target cross-entropy of a batch
      whose targets are their first token alone (``-log p``), as the RA pass of
      :func:`tl_reversed.experiments.ranking.ra_and_atp0` does: ``d p = -p d(-log p)``,
      so the same backward pass gives RA and this estimate.
    """

    def __init__(self, spec: ModelSpec, n: int, *, of: str = "metric", metric: Callable | None = None):
        if of not in ("metric", "nll"):
            raise ValueError(f"of must be 'metric' (the pass differentiates p(target)) or 'nll' (-log p), got {of!r}")
        self.spec, self.of, self.user_metric = spec, of, metric
        self.per_example = torch.zeros(n, spec.n_layers, spec.n_heads, dtype=torch.float64)
        self.base = torch.zeros(n, dtype=torch.float64)
        self._sub: Batch | None = None

    def metric(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """``p(first target token)`` at each row's last prompt token (or the ``metric`` given) of this chunk."""
        assert self._sub is not None
        if self.user_metric is not None:
            return self.user_metric(logits, self._sub)
        return _p_target_metric(self._sub)(logits)

    def hooks(self, chunk: Chunk) -> tuple[list[Hook], list[Hook]]:
        self._sub = chunk.batch
        real = (torch.arange(chunk.batch.tokens.shape[1])[None, :] < chunk.batch.lengths[:, None]).double()
        z_saved: dict[int, Tensor] = {}
        self._chunk = torch.zeros(len(chunk.batch), self.spec.n_layers, self.spec.n_heads, dtype=torch.float64)

        def keep(layer: int) -> Hook:
            def hook(z: Tensor, hook: object) -> None:
                z_saved[layer] = z.detach()

            return attn_hook(layer, "z"), hook

        def on_grad(layer: int) -> Hook:
            def hook(grad: Tensor, hook: object) -> None:
                product = (z_saved.pop(layer).double() * grad.double()).sum(-1)  # [batch, pos, head]
                self._chunk[:, layer] = einops.einsum(product.cpu(), real, "b p h, b p -> b h")

            return attn_hook(layer, "z"), hook

        layers = range(self.spec.n_layers)
        return [keep(layer) for layer in layers], [on_grad(layer) for layer in layers]

    def merge(self, chunk: Chunk) -> None:
        assert chunk.loss is not None
        loss = chunk.loss.double()
        p = loss if self.of == "metric" else torch.exp(-loss)
        factor = torch.ones_like(loss) if self.of == "metric" else -p
        self.per_example[chunk.index] = self._chunk * factor[:, None, None]
        self.base[chunk.index] = p

    def finish(self) -> tuple[Float[Tensor, "layer head"], float]:
        """The mean estimate per head, and the mean ``p(target)`` (the metric's mean for ``of="metric"``)."""
        return self.per_example.mean(0).float(), float(self.base.mean())
