"""Hook names and architecture quirks: the one module that knows them.

Everything else in ``tl_reversed`` asks this module for a hook name or a fact about
the model (heads, key/value heads, the QK scale, whether ``hook_pattern`` edits reach
the output). It serves both model classes TransformerLens users have:

* ``TransformerBridge`` (TransformerLens 4.x), in compatibility mode, and
* ``HookedTransformer`` (TransformerLens 2.x / 3.x).

Both expose the classic hook names::

    hook_embed                        [batch, pos, d_model]
    blocks.{l}.attn.hook_pattern      [batch, head, query_pos, key_pos]   post-softmax
    blocks.{l}.attn.hook_attn_scores  [batch, head, query_pos, key_pos]   pre-softmax, scaled
    blocks.{l}.attn.hook_z            [batch, pos, head, d_head]          per-head output before W_O
    blocks.{l}.attn.hook_v            [batch, pos, kv_head, d_head]       values (kv heads under GQA)
    blocks.{l}.hook_attn_out          [batch, pos, d_model]
    blocks.{l}.hook_mlp_out           [batch, pos, d_model]
    blocks.{l}.hook_resid_post        [batch, pos, d_model]

Quirks handled here:

* ``bridge.cfg.attn_scale`` is a sentinel (-1) under the bridge: the scale is read
  from the wrapped Hugging Face attention module (``scaling``, ``scale_attn``) or the
  config (``query_pre_attn_scalar`` for Gemma), per layer.
* Where the bridge hands attention to the Hugging Face module (OPT, GPT-J, GPT-Neo,
  ...), ``hook_pattern`` is observed after the fact: its edits are discarded and its
  backward hook never fires. ``hook_z`` and ``hook_v`` work everywhere, so RA and
  attention patching are built on those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EMBED = "hook_embed"
"""Forward hook that turns the embeddings into the leaf of the backward pass."""


def attn_hook(layer: int, name: str) -> str:
    """Name of an attention hook, e.g. ``attn_hook(3, "z") == "blocks.3.attn.hook_z"``."""
    return f"blocks.{layer}.attn.hook_{name}"


def block_hook(layer: int, name: str) -> str:
    """Name of a block-level hook, e.g. ``block_hook(2, "mlp_out") == "blocks.2.hook_mlp_out"``."""
    return f"blocks.{layer}.hook_{name}"


FINAL_NORM = "ln_final.hook_normalized"
"""Output of the final norm, the input of the unembedding."""

_REQUIRED_ATTN_HOOKS = ("z", "v", "pattern")


@dataclass(frozen=True)
class ModelSpec:
    """What ``tl_reversed`` needs to know about a hooked model.

    Attributes:
        kind: ``"bridge"`` (TransformerBridge) or ``"hooked"`` (HookedTransformer).
        n_layers, n_heads, n_kv_heads, d_head, n_ctx: the model's shape.
        scales: per layer, the factor ``c`` the model multiplies ``Q @ K^T`` by before
            the softmax (``1/sqrt(d_head)`` for GPT-2 and Llama).
        pattern_editable: whether an edit returned from a ``hook_pattern`` hook
            changes the model's output (False where the bridge delegates attention to
            the Hugging Face module).
    """

    kind: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    n_ctx: int
    scales: tuple[float, ...]
    pattern_editable: bool

    @property
    def kv_repeat(self) -> int:
        """How many query heads share one key/value head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads


def check_model(model: object) -> None:
    """Raise ``TypeError`` unless ``model`` is a hooked TransformerLens model we can use."""
    needed = ("hook_dict", "hooks", "cfg", "to_tokens", "blocks")
    missing = [name for name in needed if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"expected a TransformerLens model (TransformerBridge or HookedTransformer), got "
            f"{type(model).__name__} (it has no {', '.join(missing)}). Wrap a Hugging Face model "
            "with TransformerBridge.boot_transformers(name, hf_model=model) and call "
            "enable_compatibility_mode(), or use tl_reversed.load_model()."
        )
    hook_names = model.hook_dict  # type: ignore[attr-defined]
    absent = [attn_hook(0, h) for h in _REQUIRED_ATTN_HOOKS if attn_hook(0, h) not in hook_names]
    if EMBED not in hook_names:
        absent.append(EMBED)
    if absent:
        hint = (
            " Call model.enable_compatibility_mode() first: it adds the classic hook names."
            if _is_bridge(model)
            else ""
        )
        raise TypeError(f"this model has no hook {', '.join(absent)}.{hint}")


def _is_bridge(model: object) -> bool:
    return any(cls.__name__ == "TransformerBridge" for cls in type(model).__mro__)


def describe(model: object) -> ModelSpec:
    """Read the :class:`ModelSpec` of a TransformerBridge or HookedTransformer."""
    check_model(model)
    cfg = model.cfg  # type: ignore[attr-defined]
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    d_head = int(cfg.d_head)
    if _is_bridge(model):
        scales = tuple(_bridge_scale(model, layer, d_head) for layer in range(cfg.n_layers))
        pattern_editable = all(_bridge_pattern_editable(block.attn) for block in model.blocks)  # type: ignore[attr-defined]
        kind = "bridge"
    else:
        scale = 1.0 / float(cfg.attn_scale) if getattr(cfg, "use_attn_scale", True) else 1.0
        scales = tuple(
            scale / (layer + 1) if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) else scale
            for layer in range(cfg.n_layers)
        )
        pattern_editable = True
        kind = "hooked"
    return ModelSpec(
        kind=kind,
        n_layers=int(cfg.n_layers),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=d_head,
        n_ctx=int(cfg.n_ctx),
        scales=scales,
        pattern_editable=pattern_editable,
    )


def _bridge_scale(model: object, layer: int, d_head: int) -> float:
    """The QK scale of one layer of a TransformerBridge, from the wrapped module."""
    attn = model.blocks[layer].attn  # type: ignore[attr-defined]
    module = getattr(attn, "original_component", None)
    hf_config = getattr(module, "config", None)
    scaling = getattr(module, "scaling", None)
    if scaling is not None:
        scale = float(scaling)
    elif getattr(module, "scale_attn", None) is not None:  # GPT-J divides by scale_attn
        scale = 1.0 / float(torch.as_tensor(module.scale_attn))  # type: ignore[union-attr]
    elif type(module).__name__.startswith("GPTNeo"):  # GPT-Neo does not scale Q.K^T
        scale = 1.0
    else:
        pre = getattr(hf_config, "query_pre_attn_scalar", None)
        scale = float(pre) ** -0.5 if pre else 1.0 / math.sqrt(d_head)
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= layer + 1
    return scale


def _bridge_pattern_editable(attn: object) -> bool:
    """False where the bridge delegates attention to Hugging Face and only observes the pattern."""
    try:
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    except ImportError:  # pragma: no cover - only bridges reach here
        return True
    delegates = type(attn).forward is AttentionBridge.forward
    pattern_inside = bool(getattr(getattr(attn, "original_component", None), "accepts_pattern_fn", False))
    return not delegates or pattern_inside


def repeat_kv(v: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat grouped-query values ``[batch, pos, kv_head, d_head]`` to one per query head."""
    n_kv = v.shape[2]
    if n_kv == n_heads:
        return v
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key/value heads evenly")
    return v.repeat_interleave(n_heads // n_kv, dim=2)


def bos_is_prepended(model: object) -> bool:
    """Whether ``model.to_tokens`` prepends a BOS token by default."""
    return bool(getattr(model.cfg, "default_prepend_bos", True))  # type: ignore[attr-defined]
