"""Backward lens: read the gradients of the loss in the vocabulary.

Reversed Attention shows where a gradient-descent step wants to move attention; the
backward lens (Katz, Belinkov, Geva & Wolf, EMNLP 2024) shows what it wants each layer
to *write*. For a site ``s`` of layer ``l`` (``mlp_out``, ``attn_out`` or a residual
stream hook) and every position, the VJP is ``g = dL/d s`` ``[d_model]``, the gradient of
the loss with respect to that activation. It lives in the residual stream, so it can
be read through the unembedding like the logit lens reads hidden states.

Sign: **a descent step moves the activation along ``-g``.** The tokens whose logits
``-g`` raises most are "pushed toward"; the tokens ``+g`` raises most (``-g`` lowers
most) are "pushed away". With the target-token cross-entropy as the loss, the target
itself is normally pushed toward in the last layers at the position that predicts it.

Projection (``projection="weight"``, the default)::

    lens(v) = W_U^T (gain * center(v))        # [d_vocab]

``gain`` is the final norm's elementwise weight as the model applies it (``1 + weight``
for Gemma), ``center`` subtracts the mean for LayerNorm models and is the identity for
RMSNorm models; no bias (``b_U``, the norm's bias) is added, since a gradient is a
direction, not a point. This is linear in ``v`` (so ``lens(-g) = -lens(g)`` and lenses
add up) and independent of position, and it is exactly the logit lens of a
HookedTransformer loaded with ``fold_ln=True`` (which folds the same gain into
``W_U``). What it drops from the final norm's true Jacobian at position ``p`` is a
positive factor ``1/scale_p`` (which does not reorder tokens) and the projection that
removes ``v``'s component along the normalised residual ``x_p``.

``projection="jacobian"`` keeps both, so ``-lens(g)`` is the exact first-order change
of the logits at position ``p`` per unit step along ``-g``, through the direct path::

    lens_p(v) = W_U^T (gain / scale_p * (c - xhat_p (xhat_p . c) / d_model)),  c = center(v)

with ``xhat_p`` the normalised final residual (``FINAL_NORM``, before the gain) and
``scale_p`` its RMS or standard deviation. The removed component is a multiple of the
current logits, so this variant ranks tokens the model already favours lower.

Per head, the VJP at ``hook_z`` ``[d_head]`` is mapped through that head's ``W_O``
(``dz_h @ W_O[h]``, ``[d_model]``): a descent step on ``z_h`` changes the head's output
by ``-dz_h @ W_O[h]``, read the same way ("what the head's output is pushed toward").

The gradient of a weight matrix that reads a site is ``sum_p x_p^T g_p`` (its forward
inputs times its VJPs), so its rank is at most the number of positions;
:func:`gradient_rank` rebuilds it from hooks and measures that rank.

This module holds the public calls and their argument checks; the results are in
:mod:`tl_reversed.lens.results`, the projection in :mod:`tl_reversed.lens.projection`,
the pass-engine sinks in :mod:`tl_reversed.lens.sinks`, the figures and the HTML page
in :mod:`tl_reversed.views.lens` (``plot_lens`` and ``render_html`` are still reachable
here, imported on first use).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tl_reversed.core.architecture import LENS_SITES, WEIGHT_MATRICES, block_hook, describe, weight_io
from tl_reversed.core import memory
from tl_reversed.core.checks import check_layer
from tl_reversed.core.engine import Metric, run
from tl_reversed.core.inputs import PromptsLike, TargetsLike, tokenize
from tl_reversed.core.options import (
    KEEP,
    RA_PATHS,
    LENS_KEEP,
    PROJECTIONS,
    Keep,
    LensKeep,
    Matrix,
    Projection,
    RAPath,
    Site,
    check_option,
)
from tl_reversed.core.checks import check_layer, check_layers
from tl_reversed.core.rows import QueryPositions, query_rows
from tl_reversed.core.paths import pass_for, resolve_path
from tl_reversed.core.reversed_attention import RASink, accumulation_dtype, str_tokens
from tl_reversed.lens.projection import ROWS_PER_CHUNK, Projector
from tl_reversed.lens.results import BackwardLens, GradientRank, LensAndRA, TopTokens
from tl_reversed.lens.sinks import Collector, LensSink, WeightSink

DEFAULT_SITES: tuple[Site, ...] = ("mlp_out", "attn_out")
_VIEWS = ("plot_lens", "render_html")  # in tl_reversed.views.lens; see __getattr__


def _check_sites(sites: Site | Sequence[Site], model: object, layers: list[int]) -> list[str]:
    chosen = [sites] if isinstance(sites, str) else list(sites)
    if not chosen:
        raise ValueError(f"sites is empty: choose some of {LENS_SITES}")
    bad = [s for s in chosen if s not in LENS_SITES]
    if bad:
        raise ValueError(f"unknown sites {bad}: choose from {LENS_SITES}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"sites {chosen} repeat a site: name each once")
    names = model.hook_dict  # type: ignore[attr-defined]
    missing = [block_hook(layers[0], s) for s in chosen if block_hook(layers[0], s) not in names]
    if missing:
        raise ValueError(f"this model has no hook {', '.join(missing)}; choose other sites")
    return chosen


# --------------------------------------------------------------------------- public calls


def _run(
    model: torch.nn.Module,
    prompts: PromptsLike,
    targets: TargetsLike,
    *,
    sites: str | Sequence[str],
    metric: Metric | None,
    layers: Sequence[int] | int | None,
    heads: bool,
    top_k: int,
    projection: Projection,
    keep: LensKeep,
    batch_size: int | None,
    progress: bool | None,
    extra_hooks: Sequence,
    ra_keep: Keep | None,
    memory_check: bool = True,
    path: RAPath = "auto",
    query_positions: QueryPositions = None,
) -> LensAndRA | BackwardLens:
    spec = describe(model)
    chosen = check_layers(layers, spec)
    site_list = _check_sites(sites, model, chosen)
    check_option("projection", projection, PROJECTIONS)
    check_option("keep", keep, LENS_KEEP)
    if ra_keep is not None:
        check_option("ra_keep", ra_keep, KEEP)
    if not isinstance(heads, bool):
        raise TypeError(f"heads must be True or False, got {heads!r}")
    check_option("path", path, RA_PATHS)
    batch = tokenize(model, prompts, targets, spec, need_targets=metric is None, metric=metric is not None)
    rows = query_rows(query_positions, batch)
    dtype = accumulation_dtype(next(model.parameters()).dtype)
    # the lens keeps no map: only the RA it is asked for decides whether "auto" keeps the standard pass
    chosen_path = resolve_path(model, spec, batch, path=path, keep=ra_keep or "norms", query_positions=query_positions,
                               batch_size=batch_size)  # fmt: skip
    if memory.enabled(memory_check) and chosen_path == "standard":  # the bounded pass keeps no layer's patterns
        n, width = batch.tokens.shape
        parts = batch.chunks(batch_size, same_length=metric is not None)
        memory.check_pass(model, batch, parts, what="the backward lens", keep=ra_keep or "norms",
                          kept_layers=len(chosen), full_logits=metric is not None,
                          extra=_lens_bytes(model, n, max(map(len, parts)), width, len(site_list), len(chosen),
                                            spec.n_heads if heads else 0, keep))  # fmt: skip
    projector = Projector(model, projection, top_k, dtype)
    lens_sink = LensSink(model, batch, sites=site_list, layers=chosen, n_heads=spec.n_heads, heads=heads, keep=keep,
                         projector=projector, with_rank=metric is None)  # fmt: skip
    with pass_for(model, chosen_path) as gate:
        ra_sink = RASink(model, spec, chosen, batch, ra_keep, rows=rows, gate=gate) if ra_keep is not None else None
        sinks = [lens_sink, *([ra_sink] if ra_sink is not None else [])]
        loss = run(model, batch, sinks, metric=metric, batch_size=batch_size, extra_hooks=extra_hooks,
                   progress=progress, desc="backward lens")  # fmt: skip
    assert loss is not None
    out = lens_sink.finish()
    vocab = _vocab(model, out)
    lens = BackwardLens(
        norms=out.norms,
        top=out.top,
        loss=loss,
        tokens=batch.tokens,
        lengths=batch.lengths,
        str_tokens=str_tokens(model, batch),
        sites=site_list,
        layers=chosen,
        vocab=vocab,
        projection=projection,
        head_norms=out.head_norms,
        head_top=out.head_top,
        vjps=out.vjps,
        head_vjps=out.head_vjps,
        prompts=batch.prompts,
        targets=batch.target_strings,
    )
    if ra_keep is None:
        return lens
    assert ra_sink is not None
    return LensAndRA(lens, ra_sink.finish())


def _lens_bytes(model: object, n: int, chunk: int, width: int, sites: int, layers: int, heads: int, keep: str) -> int:
    """Bytes the lens keeps besides the pass: one chunk's VJPs, the kept vectors, a projection block."""
    d_model = int(model.cfg.d_model)  # type: ignore[attr-defined]
    per_row = (sites + (1 if heads else 0)) * layers * width * d_model  # VJPs (hook_z's are head * d_head wide)
    kept = n * (sites + heads) * layers * width * d_model if keep == "vectors" else 0
    block = min(ROWS_PER_CHUNK, chunk * width * max(heads, 1) * int(model.cfg.d_vocab))  # type: ignore[attr-defined]
    return 4 * (chunk * per_row + kept + 3 * block)


def _vocab(model: object, out: Collector) -> dict[int, str]:
    """The strings of every token id the result refers to."""
    tops = [out.top] + ([out.head_top] if out.head_top is not None else [])
    ids = torch.cat([torch.cat([t.toward_ids.flatten(), t.away_ids.flatten()]) for t in tops]).unique()
    ids = ids[ids >= 0]
    strings = model.to_str_tokens(ids) if ids.numel() else []  # type: ignore[attr-defined]
    return {int(i): str(s) for i, s in zip(ids.tolist(), strings)}


def backward_lens(
    model: torch.nn.Module,
    prompts: PromptsLike,
    targets: TargetsLike = None,
    *,
    sites: Site | Sequence[Site] = DEFAULT_SITES,
    metric: Metric | None = None,
    layers: Sequence[int] | int | None = None,
    heads: bool = True,
    top_k: int = 10,
    projection: Projection = "weight",
    keep: LensKeep = "vectors",
    batch_size: int | None = 16,
    progress: bool | None = None,
    extra_hooks: Sequence = (),
    memory_check: bool = True,
    path: RAPath = "auto",
) -> BackwardLens:
    """The backward lens: each site's VJP at every layer and position, read in the vocabulary.

    Args:
        model: a TransformerBridge (compatibility mode) or HookedTransformer.
        prompts: a string, a list of strings, or a token tensor ``[batch, pos]``.
        targets: one string per prompt (e.g. ``" Rome"``); the loss is the target
            cross-entropy, teacher-forced, summed over target tokens, per example.
        sites: block hooks to read, from ``("resid_pre", "attn_out", "resid_mid",
            "mlp_out", "resid_post")``.
        metric: instead of targets, any callable ``(logits, tokens) -> [batch]`` loss.
        layers: the layers to read (default all).
        heads: also map each head's ``hook_z`` VJP through its ``W_O`` and read it.
        top_k: tokens kept per vector and direction.
        projection: ``"weight"`` (final-norm gain, then ``W_U``) or ``"jacobian"`` (the
            final norm's exact linearisation at each position); see the module docstring.
        keep: ``"vectors"`` keeps the VJPs themselves; ``"tokens"`` only norms and tokens.
        batch_size: examples per forward/backward pass (``None``: all at once).
        progress: show a progress bar over the batches (``None``: when there is more than
            one; see :mod:`tl_reversed.core.options`).
        extra_hooks: forward hooks that stay on during the pass, e.g. an attention patch.
        memory_check: estimate the peak memory first and raise
            :class:`~tl_reversed.core.memory.WouldRunOutOfMemory` before any pass where it exceeds the
            memory available (see :mod:`tl_reversed.core.memory`); ``False`` skips the check
            (on the standard path; the bounded pass keeps one layer's attention pattern at a
            time, not every layer's).
        path: ``"standard"``, ``"bounded"`` or ``"auto"``, as in
            :func:`tl_reversed.core.reversed_attention.reversed_attention`: the bounded pass
            checkpoints every block, so the lens's VJPs (linear in tokens) are all it keeps
            besides one block's activations; ``"auto"`` takes it above 1 GiB of stored
            patterns (:mod:`tl_reversed.core.paths`). Both give the same lens. Unlike
            ``reversed_attention``, it does not run attention in query tiles: the recomputed
            block runs its eager attention, so one layer's ``[batch, head, T, T]`` scores and
            pattern exist while that block is recomputed (one layer at a time).

    Returns:
        A :class:`BackwardLens`. The update direction is ``-VJP``: ``toward`` tokens are
        those ``-VJP`` promotes, ``away`` tokens those it demotes.
    """
    options = dict(sites=sites, metric=metric, layers=layers, heads=heads, top_k=top_k, projection=projection,
                   keep=keep, batch_size=batch_size, progress=progress, extra_hooks=extra_hooks,
                   memory_check=memory_check, path=path)  # fmt: skip
    return _run(model, prompts, targets, **options, ra_keep=None)  # type: ignore[return-value, arg-type]


def backward_lens_and_ra(
    model: torch.nn.Module,
    prompts: PromptsLike,
    targets: TargetsLike = None,
    *,
    sites: Site | Sequence[Site] = DEFAULT_SITES,
    metric: Metric | None = None,
    layers: Sequence[int] | int | None = None,
    heads: bool = True,
    top_k: int = 10,
    projection: Projection = "weight",
    keep: LensKeep = "vectors",
    ra_keep: Keep = "maps",
    batch_size: int | None = 16,
    progress: bool | None = None,
    extra_hooks: Sequence = (),
    memory_check: bool = True,
    path: RAPath = "auto",
    query_positions: QueryPositions = None,
) -> LensAndRA:
    """The backward lens and Reversed Attention from ONE forward and backward pass.

    Takes the arguments of :func:`backward_lens`, plus ``ra_keep`` (``"maps"`` or
    ``"norms"``) and ``query_positions`` (``"last"``, ``"targets"`` or a list: RA of those
    query rows only), as ``keep`` and ``query_positions`` of
    :func:`tl_reversed.core.reversed_attention`. ``path="auto"`` keeps whole RA maps on the
    standard path and takes the bounded one for norms or rows of long prompts. Returns
    ``LensAndRA(lens, ra)``; both equal what the two separate calls give.
    """
    options = dict(sites=sites, metric=metric, layers=layers, heads=heads, top_k=top_k, projection=projection,
                   keep=keep, batch_size=batch_size, progress=progress, extra_hooks=extra_hooks,
                   memory_check=memory_check, path=path, query_positions=query_positions)  # fmt: skip
    return _run(model, prompts, targets, **options, ra_keep=ra_keep)  # type: ignore[return-value, arg-type]


def gradient_rank(
    model: torch.nn.Module,
    prompts: PromptsLike,
    targets: TargetsLike = None,
    layer: int = 0,
    matrix: Matrix = "W_in",
    *,
    metric: Metric | None = None,
    rtol: float | None = None,
) -> GradientRank:
    """The gradient of one weight matrix, rebuilt from hooks as inputs x VJPs, and its rank.

    Supported matrices (TransformerLens names, orientation ``[d_in, d_out]``): ``W_in``
    (the MLP's input projection; the linear branch of a gated MLP), ``W_gate`` (gated
    MLPs), ``W_out`` (the MLP's output projection) and ``W_O`` (all heads' output
    projection, ``[head * d_head, d_model]``). The gradient of the summed per-example
    loss is ``sum_p x_p^T g_p`` over every real position ``p`` of every example, so its rank
    is at most the number of positions (the lemma of the backward-lens paper).

    Args:
        model, prompts, targets, metric: as in :func:`backward_lens`.
        layer: the layer of the matrix.
        matrix: one of ``("W_in", "W_gate", "W_out", "W_O")``.
        rtol: relative tolerance of the rank (default ``torch.linalg.matrix_rank``'s).
    """
    spec = describe(model)
    layer = check_layer(layer, spec)
    io = weight_io(model, layer, matrix)
    batch = tokenize(model, prompts, targets, spec, need_targets=metric is None, metric=metric is not None)
    sink = WeightSink(io, matrix)
    run(model, batch, [sink], metric=metric, batch_size=None, desc="gradient rank")
    x_all, g_all = sink.finish()
    gradient = x_all.T @ g_all
    return GradientRank(
        matrix=matrix,
        layer=layer,
        rank=int(torch.linalg.matrix_rank(gradient, rtol=rtol)),
        n_positions=x_all.shape[0],
        singular_values=torch.linalg.svdvals(gradient),
        gradient=gradient,
        inputs=x_all,
        vjps=g_all,
    )


def __getattr__(name: str) -> object:
    """``plot_lens`` and ``render_html`` live in :mod:`tl_reversed.views.lens` (the views layer).

    They stay reachable as attributes of this module, imported on first use, so that the
    lens itself never imports the views at import time.
    """
    if name in _VIEWS:
        from tl_reversed.views import lens as views

        return getattr(views, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackwardLens",
    "DEFAULT_SITES",
    "GradientRank",
    "LENS_KEEP",
    "LensAndRA",
    "PROJECTIONS",
    "TopTokens",
    "WEIGHT_MATRICES",
    "backward_lens",
    "backward_lens_and_ra",
    "gradient_rank",
    "plot_lens",
    "render_html",
]
