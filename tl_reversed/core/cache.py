"""Reversed Attention from cached runs.

``ra_from_cache`` reads RA off an ``ActivationCache`` that holds the forward values
and the gradients (``run_with_cache(..., incl_bwd=True)``), so two cached runs of one
prompt, say with targets " Paris" and " Rome", can be compared without running the
model again. ``cache_with_grads`` makes such a cache for a target loss, which
``run_with_cache`` cannot (it only differentiates the mean language-model loss).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tl_reversed.core.architecture import EMBED, attn_hook, describe
from tl_reversed.core.engine import Chunk, Hook, Metric, run
from tl_reversed.core.inputs import PromptsLike, TargetsLike, tokenize
from tl_reversed.core.checks import check_layers
from tl_reversed.core.reversed_attention import ReversedAttention, ra_from_parts


def ra_from_cache(
    cache: object,
    model: torch.nn.Module | None = None,
    *,
    layers: Sequence[int] | int | None = None,
    tokens: Tensor | None = None,
) -> ReversedAttention:
    """RA maps from an ``ActivationCache`` with gradients.

    The cache must hold, for every layer, ``hook_pattern``, ``hook_v`` and the gradient
    ``hook_z_grad``: make it with ``model.run_with_cache(..., incl_bwd=True)`` or
    :func:`cache_with_grads`. ``model`` defaults to ``cache.model``; ``tokens`` (the
    input tokens, for token labels) defaults to none.
    """
    model = model if model is not None else getattr(cache, "model", None)
    if model is None:
        raise ValueError("this cache has no model attached: pass model=...")
    spec = describe(model)
    chosen = check_layers(layers, spec)
    maps, patterns = [], []
    for layer in chosen:
        names = (attn_hook(layer, "pattern"), attn_hook(layer, "v"), attn_hook(layer, "z") + "_grad")
        missing = [n for n in names if n not in cache]  # type: ignore[operator]
        if missing:
            raise ValueError(
                f"the cache has no {', '.join(missing)}: make it with run_with_cache(..., incl_bwd=True) "
                "(or tl_reversed.cache_with_grads) without a names_filter that drops these hooks"
            )
        pattern, v, grad_z = (cache[n] for n in names)  # type: ignore[index]
        maps.append(ra_from_parts(pattern, v, grad_z, spec.scales[layer]).cpu())
        patterns.append(pattern.float().cpu())
    ra = torch.stack(maps, dim=1)
    forward = torch.stack(patterns, dim=1)
    n, width = ra.shape[0], ra.shape[-1]
    if tokens is None:
        tokens = torch.zeros(n, width, dtype=torch.long)
        str_tokens = [[str(i) for i in range(width)] for _ in range(n)]
    else:
        tokens = tokens[None] if tokens.ndim == 1 else tokens
        str_tokens = [list(model.to_str_tokens(row)) for row in tokens]  # type: ignore[attr-defined]
    return ReversedAttention(
        norms=ra.flatten(-2).norm(dim=-1),
        pattern_norms=forward.flatten(-2).norm(dim=-1),
        loss=torch.full((n,), float("nan")),
        tokens=tokens.cpu(),
        lengths=torch.full((n,), width),
        str_tokens=str_tokens,
        layers=chosen,
        maps=ra,
        pattern=forward,
        scales=spec.scales,
    )


def cache_with_grads(
    model: torch.nn.Module,
    prompts: PromptsLike,
    targets: TargetsLike = None,
    *,
    metric: Metric | None = None,
    names_filter: Sequence[str] | None = None,
) -> object:
    """An ``ActivationCache`` of forward values and ``<name>_grad`` gradients for a target loss.

    Caches every attention hook RA needs (``hook_pattern``, ``hook_v``, ``hook_z``) of
    every layer, plus ``names_filter`` if given. Prompts in one call must tokenize to
    one length (run one prompt per call otherwise).
    """
    from transformer_lens import ActivationCache

    spec = describe(model)
    batch = tokenize(model, prompts, targets, spec, need_targets=metric is None, metric=metric is not None)
    if int(batch.lengths.min()) != int(batch.lengths.max()):
        raise ValueError(
            f"the prompts tokenize to lengths {sorted(set(batch.lengths.tolist()))}: a cache holds one "
            "length; call cache_with_grads once per prompt"
        )
    names = [attn_hook(layer, h) for layer in range(spec.n_layers) for h in ("pattern", "v", "z")]
    names += [n for n in (names_filter or ()) if n not in names and n != EMBED]
    sink = ActivationSink(names)
    run(model, batch, [sink], metric=metric, batch_size=None, desc="cache")
    return ActivationCache(sink.finish(), model)


class ActivationSink:
    """The pass-engine sink of a cache: forward values at ``names`` and their gradients as ``<name>_grad``.

    One chunk only (a cache holds one length): the values are kept as the hooks see them.
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.store: dict[str, Tensor] = {}

    def hooks(self, chunk: Chunk) -> tuple[list[Hook], list[Hook]]:
        def keep(key: str):
            def hook(x: Tensor, hook: object) -> None:
                self.store[key] = x.detach()

            return hook

        return [(n, keep(n)) for n in self.names], [(n, keep(n + "_grad")) for n in self.names]

    def merge(self, chunk: Chunk) -> None:
        if len(chunk.index) != len(chunk.batch) or chunk.index.tolist() != sorted(chunk.index.tolist()):
            raise AssertionError("ActivationSink takes one chunk in example order")

    def finish(self) -> dict[str, Tensor]:
        return self.store
