"""Reversed Attention from cached runs.

``ra_from_cache`` reads RA off an ``ActivationCache`` that holds the forward values
and the gradients (``run_with_cache(..., incl_bwd=True)``), so two cached runs of one
prompt, say with targets " Paris" and " Rome", can be compared without running the
model again. ``cache_with_grads`` makes such a cache for a target loss, which
``run_with_cache`` cannot (it only differentiates the mean language-model loss).

Long prompts: a cache of every layer's ``hook_pattern`` is ``layers x heads x tokens^2``
itself, so ``cache_with_grads(..., keep="norms")`` (or ``query_positions=``) caches only
the hooks named in ``names_filter`` and computes RA norms (or rows) in the same pass, on
the memory-bounded path where ``path`` says so (:mod:`tl_reversed.core.paths`); the RA
comes attached to the cache and :func:`ra_from_cache` returns it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from tl_reversed.core.architecture import EMBED, attn_hook, describe, is_square_attention
from tl_reversed.core.engine import Chunk, Hook, Metric, run
from tl_reversed.core.inputs import PromptsLike, TargetsLike, tokenize
from tl_reversed.core.checks import check_layers
from tl_reversed.core.options import KEEP, RA_PATHS, Keep, RAPath, check_option
from tl_reversed.core.paths import pass_for, resolve_path
from tl_reversed.core.reversed_attention import RASink, ReversedAttention, ra_from_parts
from tl_reversed.core.rows import QueryPositions, query_rows

ATTACHED = "reversed_attention"
"""The attribute of a cache made with ``keep="norms"`` or query rows that holds its RA."""


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
    input tokens, for token labels) defaults to none. A cache made with
    ``cache_with_grads(..., keep="norms")`` or ``query_positions=`` carries its RA
    (norms or rows, computed in its pass): that result is returned, for ``layers``.
    """
    model = model if model is not None else getattr(cache, "model", None)
    if model is None:
        raise ValueError("this cache has no model attached: pass model=...")
    spec = describe(model)
    chosen = check_layers(layers, spec)
    attached = getattr(cache, ATTACHED, None)
    if isinstance(attached, ReversedAttention):
        return _layers_of(attached, chosen)
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
    keep: Keep = "maps",
    query_positions: QueryPositions = None,
    path: RAPath = "auto",
) -> object:
    """An ``ActivationCache`` of forward values and ``<name>_grad`` gradients for a target loss.

    With ``keep="maps"`` (default) and no ``query_positions``, caches every attention hook
    RA needs (``hook_pattern``, ``hook_v``, ``hook_z``) of every layer, plus
    ``names_filter`` if given: :func:`ra_from_cache` rebuilds whole RA maps from it. That
    cache holds every layer's ``[head, pos, pos]`` pattern, so it runs on the standard
    pass (``path="bounded"`` raises).

    With ``keep="norms"`` or ``query_positions`` (``"last"``, ``"targets"`` or a list), the
    cache holds only ``names_filter`` (values and gradients; it may be empty), and RA norms
    (and the maps of the chosen query rows) are computed in the same pass, as
    :func:`tl_reversed.core.reversed_attention.reversed_attention` would: they come as
    ``cache.reversed_attention`` and :func:`ra_from_cache` returns them. ``path``
    (``"auto"``, ``"standard"``, ``"bounded"``) chooses the pass as there; on the bounded
    pass ``names_filter`` cannot name ``hook_pattern`` or ``hook_attn_scores`` (the
    ``tokens^2`` tensors it avoids keeping). Unlike ``reversed_attention``, this bounded
    pass does not run attention in query tiles: every model's recomputed block runs its
    eager attention, so one layer's ``[batch, head, T, T]`` scores and pattern exist while
    that block is recomputed (one layer at a time, not every layer's). Prompts in one call
    must tokenize to one length (run one prompt per call otherwise).
    """
    from transformer_lens import ActivationCache

    spec = describe(model)
    check_option("keep", keep, KEEP)
    check_option("path", path, RA_PATHS)
    batch = tokenize(model, prompts, targets, spec, need_targets=metric is None, metric=metric is not None)
    if int(batch.lengths.min()) != int(batch.lengths.max()):
        raise ValueError(
            f"the prompts tokenize to lengths {sorted(set(batch.lengths.tolist()))}: a cache holds one "
            "length; call cache_with_grads once per prompt"
        )
    whole_maps = keep == "maps" and query_positions is None
    chosen_path = resolve_path(model, spec, batch, path=path, keep=keep, query_positions=query_positions,
                               batch_size=None)  # fmt: skip
    requested = [n for n in (names_filter or ()) if n != EMBED]
    if whole_maps and chosen_path == "bounded":
        raise ValueError(
            "cache_with_grads(keep='maps') caches every layer's hook_pattern ([head, pos, pos] per layer), which "
            "is what the bounded pass avoids keeping: pass keep='norms' or query_positions='last' (RA is then "
            "computed in the pass and attached to the cache; name the other hooks you need in names_filter), "
            "or path='standard'"
        )
    if chosen_path == "bounded":
        quadratic = [n for n in requested if is_square_attention(n)]
        if quadratic:
            raise ValueError(
                f"names_filter asks for {quadratic}: [head, pos, pos] tensors of every layer, which the bounded pass "
                "does not keep; leave them out (RA norms and rows come attached to the cache) or pass path='standard'"
            )
    names = [attn_hook(layer, h) for layer in range(spec.n_layers) for h in ("pattern", "v", "z")] if whole_maps else []
    names += [n for n in requested if n not in names]
    rows = query_rows(query_positions, batch)
    with pass_for(model, chosen_path) as gate:
        sink = ActivationSink(names)
        ra = None if whole_maps else RASink(model, spec, list(range(spec.n_layers)), batch, keep, rows=rows, gate=gate)
        run(model, batch, [sink, *([ra] if ra is not None else [])], metric=metric, batch_size=None, desc="cache")
    cache = ActivationCache(sink.finish(), model)
    if ra is not None:
        setattr(cache, ATTACHED, ra.finish())
    return cache


def _layers_of(result: ReversedAttention, layers: list[int]) -> ReversedAttention:
    """``result`` restricted to ``layers`` (each one it holds: the cache's RA covers every layer)."""
    if layers == result.layers:
        return result
    index = [result.layers.index(layer) for layer in layers]
    pick = (lambda t: None if t is None else t[:, index])  # noqa: E731
    return dataclasses.replace(result, norms=pick(result.norms), pattern_norms=pick(result.pattern_norms),
                               maps=pick(result.maps), pattern=pick(result.pattern), layers=list(layers))  # fmt: skip


class ActivationSink:
    """The pass-engine sink of a cache: forward values at ``names`` and their gradients as ``<name>_grad``.

    One chunk only (a cache holds one length): the values are kept as the hooks see them.
    On the bounded pass they are kept from the forward (a block's recomputation may stop
    before its last hook: torch recomputes only what the backward needs).
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
