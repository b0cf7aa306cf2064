"""Where each attention class computes its ``[T, T]`` scores and takes its mask; the tiled attention put there.

The architecture quirks of attention itself (an extension of
:mod:`tl_reversed.core.architecture`, kept apart for length): how the memory-bounded pass
tiles it, and how a segment mask of our own reaches it (:func:`mask_route`). :func:`tiled_attention_on`
makes every attention module of a model compute
``softmax(mask(cap(Q K^T c))) V`` with :class:`tl_reversed.core.tiled_attention.TiledAttention`
instead of its eager scores and pattern, for the duration of a ``with`` block, on that
model instance only (instance attributes, removed on the way out, also after an error):

* ``PositionEmbeddingsAttentionBridge`` (Llama, SmolLM2, Gemma 3, Qwen, ... under the
  bridge): the bridge's own code runs up to its key/value-cache step, so ``hook_q``,
  ``hook_k``, ``hook_v``, the QK norms, rotary and ``hook_rot_q`` / ``hook_rot_k`` fire with
  the values (and edits) they always have; the post-rotary ``Q`` is read at ``hook_rot_q``
  and ``K``, ``V`` at the cache step (``_update_kv_cache``, which hands them over instead
  of computing scores). Scale (``scaling``), soft cap (``attn_logit_softcapping``) and the
  model's own 4D mask (causal, sliding window: Gemma 3's local layers) are read from the
  module and applied to each tile by the bridge's own mask code.
* ``JointQKVAttentionBridge`` (GPT-2 under the bridge): its ``_reconstruct_attention``
  receives ``Q, K, V`` after ``hook_q`` / ``hook_k`` / ``hook_v``; scale ``d_head^-0.5``
  (divided by ``layer + 1`` where the model scales by the inverse layer index).

Then ``hook_z`` (``o.hook_in``) and ``hook_out`` fire as in the eager code.
``hook_attn_scores`` and ``hook_pattern`` do not fire: no whole pattern exists.

Everything else keeps its eager attention (:func:`tiled_unsupported` says why):
attention the bridge delegates to Hugging Face (OPT, GPT-J, GPT-Neo, ...), the
HookedTransformer of TransformerLens 2.x/3.x, and options whose tail the tiles do not
reproduce (attention sinks, gated or post-rotary-normed queries, ``use_attn_result``,
GPT-2's ``reorder_and_upcast_attn``, dropout in training mode).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from tl_reversed.core import rows as row_tiles
from tl_reversed.core.architecture import SQUARE_ATTN_HOOKS, attn_hook, describe
from tl_reversed.core.tiled_attention import TileObserver, causal_mask, tile_rows, tiled_attention


class _Handoff(Exception):
    """Raised at the cache step of the bridge's attention: carries the post-rotary ``K`` and ``V``."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__("tiled attention hand-off (caught inside the attention module)")
        self.key, self.value = key, value


def _classes() -> tuple[type, type] | None:
    try:
        from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import JointQKVAttentionBridge
        from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
            PositionEmbeddingsAttentionBridge,
        )
    except ImportError:  # TransformerLens 2.x/3.x: HookedTransformer only
        return None
    return PositionEmbeddingsAttentionBridge, JointQKVAttentionBridge


def _kind(attn: torch.nn.Module) -> str | None:
    classes = _classes()
    if classes is None:
        return None
    position, joint = classes
    cls = type(attn)
    if isinstance(attn, position) and cls.forward is position.forward:
        same = all(getattr(cls, m) is getattr(position, m) for m in ("_update_kv_cache", "_pre_output_projection"))
        return "position" if same else None
    if isinstance(attn, joint) and cls.forward is joint.forward and cls._reconstruct_attention is joint._reconstruct_attention:
        return "joint"
    return None


def _why_not(attn: Any, kind: str | None) -> str | None:
    if kind is None:
        return f"its attention ({type(attn).__name__}) computes scores where the tiles cannot reach them"
    cfg, hf_attn = attn.config, attn.original_component
    if bool(getattr(cfg, "use_attn_result", False)):
        return "use_attn_result is on (per-head results are computed from the eager tail)"
    if attn.training and float(getattr(hf_attn, "attention_dropout", 0.0) or getattr(hf_attn, "attn_dropout", 0.0) or 0.0):
        return "it is in training mode with attention dropout"
    if kind == "joint":
        return "it upcasts and reorders attention (reorder_and_upcast_attn)" if getattr(attn, "_reorder_and_upcast_attn", False) else None
    if not hasattr(attn, "hook_rot_q"):
        return "its attention has no hook_rot_q to read the post-rotary queries from"
    if getattr(hf_attn, "sinks", None) is not None:
        return "it has attention sinks"
    if getattr(cfg, "gated_q_proj", False) or getattr(cfg, "qk_norm_after_rope", False):
        return "its queries are gated or normed after rotary"
    gate = attn._modules.get("gate")
    if gate is not None and getattr(gate, "original_component", None) is not None:
        return "its attention output is gated"
    return None


def tiled_unsupported(model: Any) -> str | None:
    """Why ``model``'s attention cannot run in tiles (``None``: every layer can)."""
    for layer, block in enumerate(model.blocks):
        reason = _why_not(block.attn, _kind(block.attn))
        if reason is not None:
            return f"layer {layer}: {reason}"
    return None


def _tile(q: torch.Tensor) -> int:
    n, n_heads, width, _ = q.shape
    return tile_rows(n, n_heads, width, row_tiles.TILE_ELEMENTS)


def _mask(attn: Any, attention_mask: torch.Tensor | None, width: int):
    """Per-tile masking as the eager code does it: the model's 4D mask rows, or the plain causal mask."""
    if attention_mask is None:
        return causal_mask
    if attention_mask.ndim < 4:
        raise RuntimeError(
            f"the tiled attention needs the model's 4D attention mask or none, got a {attention_mask.ndim}D one: "
            "call reversed_attention(..., path='standard')"
        )

    def mask(scores: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        rows = attention_mask[..., start:stop, :]
        return attn._apply_reconstruct_attention_mask(attn_scores=scores, attention_mask=rows, seq_len=width, q_seq_len=stop - start)

    return mask


def _position_forward(attn: Any, layer: int, observers: Mapping[int, TileObserver]):
    original = type(attn).forward

    def forward(*args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        attention_mask = kwargs.get("attention_mask")
        seen: dict[str, torch.Tensor] = {}
        handle = attn.hook_rot_q.register_forward_hook(lambda module, inputs, output: seen.__setitem__("q", output))
        try:
            original(attn, *args, **kwargs)
            raise RuntimeError(f"layer {layer}: the attention never reached its cache step; use path='standard'")
        except _Handoff as handoff:
            key, value = handoff.key, handoff.value
        finally:
            handle.remove()
        q, hf_attn = seen["q"], attn.original_component
        head_dim = hf_attn.head_dim
        z = tiled_attention(
            q, key, value, float(getattr(hf_attn, "scaling", head_dim**-0.5)),
            softcap=getattr(hf_attn, "attn_logit_softcapping", None), mask=_mask(attn, attention_mask, key.shape[-2]),
            tile=_tile(q), observer=observers.get(layer),
        )  # fmt: skip
        out = z.transpose(1, 2).reshape(*hidden.shape[:-1], -1)
        o_weight = getattr(getattr(getattr(attn, "o", None), "original_component", None), "weight", None)
        if isinstance(o_weight, torch.Tensor) and o_weight.dtype.is_floating_point and out.dtype != o_weight.dtype:
            out = out.to(o_weight.dtype)  # as the eager code: match the projection's dtype
        return attn.hook_out(attn.o(out)), None

    def handoff(key_states, value_states, **kwargs):
        raise _Handoff(key_states, value_states)

    return {"forward": forward, "_update_kv_cache": handoff}


def _joint_reconstruct(attn: Any, layer: int, observers: Mapping[int, TileObserver]):
    def reconstruct(q, k, v, **kwargs):
        n_heads = attn.config.n_heads
        n_kv = getattr(attn.config, "n_key_value_heads", None) or n_heads
        q, k, v, batch_size, seq_len, head_dim = attn._reshape_qkv_to_heads(q, k, v, n_heads, n_kv)
        scale = head_dim ** (-0.5)
        if getattr(attn.config, "scale_attn_by_inverse_layer_idx", False) and attn._layer_idx is not None:
            scale /= float(attn._layer_idx + 1)
        mask = _mask(attn, kwargs.get("attention_mask"), k.shape[-2])
        z = tiled_attention(q, k, v, scale, mask=mask, tile=_tile(q), observer=observers.get(layer))
        out = attn._reshape_attn_output(z, batch_size, seq_len, n_heads, head_dim)
        return attn._apply_output_projection(out), None

    return {"_reconstruct_attention": reconstruct}


@contextmanager
def tiled_attention_on(model: Any, observers: Mapping[int, TileObserver]) -> Iterator[None]:
    """Every attention module of ``model`` in tiles for the duration; ``observers[layer]`` gets its RA tiles.

    Raises ``ValueError`` (nothing changed) where :func:`tiled_unsupported` gives a reason;
    ``RuntimeError`` where an instance attribute it would set is already there.
    """
    reason = tiled_unsupported(model)
    if reason is not None:
        raise ValueError(f"this model's attention cannot run in tiles ({reason})")
    attns = [block.attn for block in model.blocks]
    swaps = []
    for layer, attn in enumerate(attns):
        make = _position_forward if _kind(attn) == "position" else _joint_reconstruct
        swaps.append(make(attn, layer, observers))
    taken = [i for i, (attn, swap) in enumerate(zip(attns, swaps)) if any(name in vars(attn) for name in swap)]
    if taken:
        raise RuntimeError(f"the attention of layers {taken} already has an instance-level override: remove it first")
    try:
        for attn, swap in zip(attns, swaps):
            for name, fn in swap.items():
                object.__setattr__(attn, name, fn)  # the bridge forwards unknown attributes to the HF module
        yield
    finally:
        for attn, swap in zip(attns, swaps):
            for name in swap:
                vars(attn).pop(name, None)


def refuse_whole_pattern_hooks(model: Any, extra_hooks: Sequence[tuple[object, object]]) -> None:
    """Raise ``ValueError`` where a hook would wait on ``hook_pattern`` / ``hook_attn_scores`` in tiles.

    Those hooks never fire on the tiled path (no whole pattern exists), so an attention
    patch or a probe placed there would silently do nothing: the caller's ``extra_hooks``
    (names, or name filters) and hooks left on the model are both checked.
    """
    names = [attn_hook(layer, name) for layer in range(len(model.blocks)) for name in SQUARE_ATTN_HOOKS]
    asked = [n for hook_name, _ in extra_hooks for n in names if (hook_name == n if isinstance(hook_name, str) else hook_name(n))]
    left = [n for n in names if n in model.hook_dict and len(getattr(model.hook_dict[n], "_forward_hooks", {}))]
    if asked or left:
        where = f"extra_hooks on {asked[:3]}" if asked else f"hooks left on the model at {left[:3]}"
        raise ValueError(
            f"the bounded path computes attention in query tiles: hook_pattern and hook_attn_scores never hold "
            f"a whole pattern there and never fire, so {where} would do nothing. Patch attention at hook_z "
            "(einsum of the pattern change and hook_v), or call reversed_attention(..., path='standard')"
        )


# --------------------------------------------------------------------------- segment masks
_MASK_TAKING = {f"{p}AttentionBridge" for p in ("", "JointQKV", "PositionEmbeddings", "JointQKVPositionEmbeddings")}


@dataclass(frozen=True)
class MaskRoute:
    """How a mask of our own reaches the attention (:mod:`tl_reversed.core.segments`); see :func:`mask_route`."""

    kind: str
    q_hook: str = "q"
    k_hook: str = "k"
    softcap: float | None = None


def mask_route(model: object) -> MaskRoute:
    """How to replace the model's attention mask, or ``TypeError`` saying why it cannot be replaced: ``"kwarg"``
    (bridge): every ``blocks[l].attn`` takes a 4-D ``attention_mask`` ``[batch, 1, query, key]`` as the whole mask.
    ``"scores"`` (HookedTransformer, which masks before ``hook_attn_scores``): recompute the scores there from
    ``q_hook`` / ``k_hook`` (post-rotary), times ``describe(model).scales[l]``, soft-capped at ``softcap``."""
    spec, cfg = describe(model), model.cfg  # type: ignore[attr-defined]
    if spec.kind == "hooked":
        if cfg.positional_embedding_type == "alibi" or getattr(cfg, "use_logn_attn", False):  # scores not from q.k alone
            raise TypeError("segment masks are not supported on a HookedTransformer with ALiBi or log-n attention")
        rot, cap = "rot_" if cfg.positional_embedding_type == "rotary" else "", getattr(cfg, "attn_scores_soft_cap", None)
        return MaskRoute("scores", f"{rot}q", f"{rot}k", cap if cap and cap > 0 else None)
    for layer, block in enumerate(model.blocks):  # type: ignore[attr-defined]
        hf, owner = block.attn.original_component, type(block.attn).forward.__qualname__.split(".")[0]
        impl = getattr(getattr(hf, "config", None), "_attn_implementation", None) or "eager"
        own_mask = "bias" in dict(hf.named_buffers(recurse=False)) or not getattr(hf, "is_causal", False)
        if owner not in _MASK_TAKING or (owner == "AttentionBridge" and (own_mask or impl not in ("eager", "sdpa"))):
            raise TypeError(f"segment masks are not supported for layer {layer}'s attention ({type(block.attn).__name__} "
                            f"over {type(hf).__name__}, {impl}): it takes no 4-D attention mask. Supported: the bridge's "
                            "own attention (GPT-2, Llama, Gemma...), delegated eager/SDPA attention (OPT, GPT-J), HookedTransformer")
    return MaskRoute("kwarg")
