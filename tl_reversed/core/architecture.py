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
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tl_reversed.core.options import MATRICES, SITES

EMBED = "hook_embed"
"""Forward hook that turns the embeddings into the leaf of the backward pass."""


def attn_hook(layer: int, name: str) -> str:
    """Name of an attention hook, e.g. ``attn_hook(3, "z") == "blocks.3.attn.hook_z"``."""
    return f"blocks.{layer}.attn.hook_{name}"


def block_hook(layer: int, name: str) -> str:
    """Name of a block-level hook, e.g. ``block_hook(2, "mlp_out") == "blocks.2.hook_mlp_out"``."""
    return f"blocks.{layer}.hook_{name}"


def block_of(name: str) -> int | None:
    """The layer of a hook inside a block (``"blocks.3.attn.hook_z"`` -> 3); None outside the blocks."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


SQUARE_ATTN_HOOKS = ("pattern", "attn_scores")
"""Attention hooks of ``[batch, head, query_pos, key_pos]``: tokens^2 per layer (they never fire in tiles)."""


def is_square_attention(name: str) -> bool:
    """Whether hook ``name`` is one of a layer's ``[head, query_pos, key_pos]`` tensors."""
    return block_of(name) is not None and name.endswith(tuple(f".hook_{h}" for h in SQUARE_ATTN_HOOKS))


FINAL_NORM = "ln_final.hook_normalized"
"""The final norm's normalised residual, before its elementwise weight (see ``final_norm``)."""

UNEMBED_IN = "unembed.hook_in"
"""The unembedding's input ``[batch, pos, d_model]`` (after the final norm), on both model classes.

Everything after it is position-wise, so a hook here may keep only some positions: the
logits then come out for those positions alone (see :func:`positions_hook`).
"""

_REQUIRED_ATTN_HOOKS = ("z", "v", "pattern")


class Model(Protocol):
    """What ``tl_reversed`` uses of a hooked model: a TransformerBridge (compatibility
    mode) or a HookedTransformer both are one. A type for annotations only; the check
    at run time is :func:`check_model`.
    """

    cfg: Any
    hook_dict: dict[str, Any]

    def hooks(
        self, fwd_hooks: Sequence[tuple[str, Callable]] = ..., bwd_hooks: Sequence[tuple[str, Callable]] = ..., **kwargs: Any
    ) -> AbstractContextManager[Any]: ...

    def to_tokens(self, input: Any, prepend_bos: Any = ..., **kwargs: Any) -> torch.Tensor: ...

    def to_str_tokens(self, input: Any, **kwargs: Any) -> Any: ...

    def parameters(self, recurse: bool = ...) -> Iterator[torch.nn.Parameter]: ...

    def __call__(self, input: Any, *args: Any, **kwargs: Any) -> Any: ...


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


# --------------------------------------------------------------------------- backward lens

FINAL_NORM_SCALE = "ln_final.hook_scale"
"""The final norm's divisor ``[batch, pos, 1]``: the RMS (RMSNorm) or standard deviation (LayerNorm).

On both model classes ``FINAL_NORM`` (``ln_final.hook_normalized``) is the normalised
residual *before* the norm's elementwise weight: ``(x - mean) / scale`` or ``x / scale``.
"""

LENS_SITES = SITES
"""Block hooks whose gradient lives in the residual stream, readable through the unembedding."""

WEIGHT_MATRICES = MATRICES
"""Weight matrices whose gradient :func:`weight_io` can rebuild from hooks (TransformerLens names)."""


def mlp_hook(layer: int, name: str) -> str:
    """Name of an MLP hook, e.g. ``mlp_hook(1, "post") == "blocks.1.mlp.hook_post"``."""
    return f"blocks.{layer}.mlp.hook_{name}"


@dataclass(frozen=True)
class NormAffine:
    """The input-independent part of a norm: ``y = gain * center(x) / scale(x) + bias``.

    Attributes:
        gain: the elementwise weight ``[d_model]`` as the model applies it (``1 + weight``
            for Gemma's RMSNorm; ones for a norm without weight).
        bias: the additive bias ``[d_model]`` (LayerNorm), or None.
        centered: whether the norm subtracts the mean (LayerNorm) before scaling.
    """

    gain: torch.Tensor
    bias: torch.Tensor | None
    centered: bool


def _hooked_norm_affine(module: torch.nn.Module, d_model: int) -> NormAffine:
    """NormAffine of a HookedTransformer norm (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)."""
    gain = getattr(module, "w", None)
    bias = getattr(module, "b", None)
    ref = next(iter(module.parameters()), None)
    if gain is None:
        gain = torch.ones(d_model, dtype=ref.dtype if ref is not None else torch.float32)
    return NormAffine(
        gain=gain.detach().clone(),
        bias=None if bias is None else bias.detach().clone(),
        centered="LayerNorm" in type(module).__name__,
    )


def _probe_norm_affine(module: torch.nn.Module, d_model: int, dtype: torch.dtype, device: torch.device) -> NormAffine:
    """NormAffine of a Hugging Face norm module, measured by calling it on known inputs.

    With ``x = 1000 * s`` for a sign pattern ``s`` of mean 0 and RMS 1, every norm of the
    form ``gain * center(x) / scale(x) + bias`` sees the normalised input ``s`` (the eps is
    negligible against 1e6), so ``f(x) - f(-x) = 2 gain * s`` and ``f(x) + f(-x) = 2 bias``;
    adding a constant to ``x`` changes nothing only if the norm centres. This reads Gemma's
    ``1 + weight``, weightless norms and LayerNorm biases without knowing the class.
    """
    if d_model % 2:
        raise ValueError(f"cannot probe the final norm of a model with odd d_model={d_model}")
    sign = torch.ones(d_model, dtype=dtype, device=device)
    sign[1::2] = -1
    x = 1000.0 * sign[None]
    with torch.no_grad():
        plus, minus = module(x)[0].double(), module(-x)[0].double()
        shifted = module(x + 1000.0)[0].double()
    gain = (plus - minus) / (2 * sign.double())
    bias = (plus + minus) / 2
    centered = bool(torch.allclose(shifted, plus, rtol=1e-3, atol=1e-3 * float(gain.abs().max())))
    has_bias = bool(bias.abs().max() > 1e-6 * max(float(gain.abs().max()), 1.0))
    return NormAffine(gain=gain.to(dtype), bias=bias.to(dtype) if has_bias else None, centered=centered)


def _norm_affine(model: object, norm: torch.nn.Module) -> NormAffine:
    d_model = int(model.cfg.d_model)  # type: ignore[attr-defined]
    if not _is_bridge(model):
        return _hooked_norm_affine(norm, d_model)
    original = getattr(norm, "original_component", None)
    if original is None:
        raise TypeError(f"the norm {type(norm).__name__} wraps no Hugging Face module to read its weight from")
    own = next(original.parameters(), None)  # probe the norm on its own device (a split model's last)
    param = own if own is not None else next(model.parameters())  # type: ignore[attr-defined]
    return _probe_norm_affine(original, d_model, param.dtype, param.device)


def final_norm(model: object) -> NormAffine:
    """The elementwise gain, bias and centering of the model's final norm (``ln_final``)."""
    module = getattr(model, "ln_final", None)
    if module is None:
        raise TypeError("this model has no ln_final: the backward lens needs a final norm before the unembedding")
    return _norm_affine(model, module)


def unembed_weight(model: object) -> torch.Tensor:
    """The unembedding ``W_U`` ``[d_model, d_vocab]`` (detached), the same on both model classes."""
    return model.W_U.detach()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class WeightIO:
    """Where to read a weight matrix's forward input and the gradient of its output.

    ``grad(W) = sum over positions of input^T @ grad(output)`` (TransformerLens orientation
    ``[d_in, d_out]``; for ``W_O`` the input is ``hook_z`` flattened to ``head * d_head``).

    Attributes:
        matrix: the TransformerLens name (``W_in``, ``W_gate``, ``W_out``, ``W_O``).
        input_hook: forward hook holding the matrix's input.
        grad_hook: hook whose gradient is the VJP at the matrix's output (biases do not matter).
        input_norm: where ``input_hook`` is a norm's pre-weight output (HookedTransformer's
            ``ln2.hook_normalized``), the affine part to apply to it; otherwise None.
    """

    matrix: str
    input_hook: str
    grad_hook: str
    input_norm: NormAffine | None = None


def weight_io(model: object, layer: int, matrix: str) -> WeightIO:
    """The hooks that rebuild the gradient of one weight matrix of one layer.

    On a TransformerBridge the MLP input is ``mlp.hook_in`` and the outputs of ``W_O`` and
    ``W_out`` are ``attn.o.hook_out`` and ``mlp.out.hook_out`` (before any post-norm, as in
    Gemma). On a HookedTransformer the MLP input is rebuilt from ``ln2.hook_normalized``
    and the outputs are ``hook_attn_out`` / ``hook_mlp_out``, which models with post-norms
    (``use_normalization_before_and_after``) do not expose.
    """
    if matrix not in WEIGHT_MATRICES:
        raise ValueError(f"unknown matrix {matrix!r}: choose one of {WEIGHT_MATRICES}")
    hook_names = model.hook_dict  # type: ignore[attr-defined]
    gated = mlp_hook(layer, "pre_linear") in hook_names
    bridge = _is_bridge(model)
    if matrix == "W_gate" and not gated:
        raise ValueError("this model's MLP is not gated: it has no W_gate; use W_in, W_out or W_O")
    cfg = model.cfg  # type: ignore[attr-defined]
    post_norms = not bridge and bool(getattr(cfg, "use_normalization_before_and_after", False))
    if post_norms and matrix in ("W_O", "W_out"):
        raise ValueError(
            f"this HookedTransformer applies a norm after the {'attention' if matrix == 'W_O' else 'MLP'} "
            f"output and has no hook before it, so the gradient of {matrix} cannot be read from hooks; "
            "use a TransformerBridge (tl_reversed.load_model or TransformerBridge.boot_transformers)"
        )
    if matrix == "W_O":
        grad = f"blocks.{layer}.attn.o.hook_out" if bridge else block_hook(layer, "attn_out")
        return WeightIO(matrix, attn_hook(layer, "z"), grad)
    if matrix == "W_out":
        grad = f"blocks.{layer}.mlp.out.hook_out" if bridge else block_hook(layer, "mlp_out")
        return WeightIO(matrix, mlp_hook(layer, "post"), grad)
    grad = mlp_hook(layer, "pre" if matrix == "W_gate" or not gated else "pre_linear")
    if bridge:
        return WeightIO(matrix, mlp_hook(layer, "in"), grad)
    ln2 = model.blocks[layer].ln2  # type: ignore[attr-defined]
    return WeightIO(matrix, f"blocks.{layer}.ln2.hook_normalized", grad, _norm_affine(model, ln2))


# --------------------------------------------------------------------------- flow graph


@dataclass(frozen=True)
class BlockWrites:
    """How one block writes to the residual stream (for :func:`tl_reversed.flow_graph`).

    ``attn_out = post_norm(sum_h z_h @ W_O[h] + b_O)`` and ``mlp_out = post_norm(act @ W_out + b_out)``,
    where ``post_norm`` is the identity, or (Gemma) an RMSNorm whose scale is read from a
    hook, so that with the scale frozen every head's and neuron's share adds up exactly.

    Attributes:
        W_O: ``[head, d_head, d_model]``; b_O: ``[d_model]`` or None.
        W_out: ``[d_mlp, d_model]`` (rows multiply ``mlp.hook_post``, which already holds
            the gate product of a gated MLP); b_out: ``[d_model]`` or None.
        attn_post, mlp_post: the post-norms' affine parts, or None without post-norms.
        attn_post_scale, mlp_post_scale: forward hooks holding their divisors ``[batch, pos, 1]``.
        parallel: attention and MLP both read ``resid_pre`` (GPT-J, NeoX): no ``resid_mid``.
    """

    W_O: torch.Tensor
    b_O: torch.Tensor | None
    W_out: torch.Tensor
    b_out: torch.Tensor | None
    attn_post: NormAffine | None
    mlp_post: NormAffine | None
    attn_post_scale: str
    mlp_post_scale: str
    parallel: bool


def block_writes(model: object, layer: int) -> BlockWrites:
    """The weights and post-norms through which block ``layer`` writes to the residual stream."""
    block = model.blocks[layer]  # type: ignore[attr-defined]
    hook_names = model.hook_dict  # type: ignore[attr-defined]
    w_out = getattr(block.mlp, "W_out", None)
    if w_out is None:
        raise TypeError(f"the MLP of block {layer} exposes no W_out: the flow graph cannot split it into neurons")

    def bias(module: object, name: str) -> torch.Tensor | None:
        value = getattr(module, name, None)
        return None if value is None else value.detach()

    def post(name: str) -> NormAffine | None:
        module = getattr(block, name, None)
        return None if module is None else _norm_affine(model, module)

    return BlockWrites(
        W_O=block.attn.W_O.detach(),
        b_O=bias(block.attn, "b_O"),
        W_out=w_out.detach(),
        b_out=bias(block.mlp, "b_out"),
        attn_post=post("ln1_post"),
        mlp_post=post("ln2_post"),
        attn_post_scale=f"blocks.{layer}.ln1_post.hook_scale",
        mlp_post_scale=f"blocks.{layer}.ln2_post.hook_scale",
        parallel=block_hook(layer, "resid_mid") not in hook_names,
    )


def final_logits(model: object, x: torch.Tensor) -> torch.Tensor:
    """Logits of residual vectors ``[..., d_model]`` read through the model's own final norm and unembedding.

    The logit lens: for the last block's ``resid_post`` these are the model's logits.
    """
    shape = x.shape
    flat = x.reshape(1, -1, shape[-1])
    logits = model.unembed(model.ln_final(flat))  # type: ignore[attr-defined]
    return logits.reshape(*shape[:-1], logits.shape[-1])


def hooks_at_unembed(names: Sequence[object]) -> bool:
    """Whether hooks on these points would see what :func:`tl_reversed.core.engine.positions_hook` trims.

    The unembedding's input and output (``unembed.hook_in``, ``unembed.hook_out``, the
    bridge's alias ``hook_unembed``) hold the kept positions alone under it, and so do
    the gradients there: callers hooking them need the full logits. A name filter that
    is not a string may match them, so it counts as one.
    """
    return any(not isinstance(name, str) or name.startswith("unembed.") or name == "hook_unembed" for name in names)

