"""A trainable Hugging Face copy of a bridge's model, and custom 4-D attention masks for it.

Fine-tuning (LoRA through ``peft``, :mod:`tl_reversed.experiments.segment_lora`) does not
run through the TransformerBridge: a bridge replaces the wrapped Hugging Face model's
modules by its own components (``q_proj`` becomes a ``LinearBridge`` around the
``nn.Linear``), so peft's default targets are not found there (peft refuses a
``LinearBridge``; injected into the inner ``nn.Linear`` the adapter does reach the
bridge's forward, checked on a tiny Llama), and training in place would change the user's
model. Instead :func:`hf_copy` builds a plain Hugging Face
model of the same class from the bridge's weights, as the bridge uses them (after
compatibility mode's processing: norms folded, unembedding centred), and checks that
it reproduces the bridge's logits exactly. The copy:

* has untied input and output embeddings (folding the final norm into the unembedding
  makes them differ; tied, loading one would overwrite the other);
* uses eager attention, like the bridge's own wrapped model;
* takes a custom mask as a 4-D float tensor ``[batch, 1, query, key]`` (0 where allowed,
  the dtype's minimum elsewhere): ``transformers`` 5 passes a 4-D ``attention_mask``
  through unchanged (``masking_utils``) and eager attention adds it to the scores.
  :func:`hf_copy` checks on every copy that the 4-D causal mask gives exactly the
  model's own causal logits, so an architecture that ignores custom masks is refused
  with a clear error rather than trained silently under the wrong mask.

This module is the one place that knows the Hugging Face side of a bridge: how its
parameter names nest (``_original_component``) and which modules are the attention
projections LoRA targets (:data:`ATTENTION_PROJECTIONS`).
"""

from __future__ import annotations

import copy
import re

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_reversed.core.state import untouched

ATTENTION_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma3_text": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("c_attn", "attn.c_proj"),
}
"""Per Hugging Face ``model_type``: the attention modules LoRA adapts (query, key, value, output)."""

_WRAPPER = re.compile(r"(\._original_component)+")


def attention_projections(hf_model) -> tuple[str, ...]:
    """The attention projection names of ``hf_model``'s architecture (peft ``target_modules``).

    Raises:
        ValueError: an architecture not in :data:`ATTENTION_PROJECTIONS`; pass the names yourself.
    """
    kind = getattr(hf_model.config, "model_type", None)
    if kind not in ATTENTION_PROJECTIONS:
        raise ValueError(
            f"no default LoRA targets for model_type {kind!r} (known: {', '.join(ATTENTION_PROJECTIONS)}): "
            "pass targets=[...] with the names of its attention projection modules"
        )
    return ATTENTION_PROJECTIONS[kind]


def additive_mask(allowed: Bool[Tensor, "batch query key"], dtype: torch.dtype) -> Float[Tensor, "batch 1 query key"]:
    """``True`` -> 0, ``False`` -> the dtype's minimum: the 4-D float mask eager attention adds to the scores."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, low)[:, None]


def causal_allowed(batch: int, pos: int, device=None) -> Bool[Tensor, "batch query key"]:
    """The causal mask as booleans (a query sees itself and earlier keys)."""
    mask = torch.ones(pos, pos, dtype=torch.bool, device=device).tril()
    return mask.expand(batch, pos, pos)


def masked_logits(hf_model, tokens: Int[Tensor, "batch pos"], allowed: Bool[Tensor, "batch query key"]):
    """Logits ``[batch, pos, d_vocab]`` of a Hugging Face model under a custom mask.

    Positions are ``0..pos-1`` for every row (right padding keeps them right).
    """
    dtype = next(hf_model.parameters()).dtype
    return hf_model(input_ids=tokens, attention_mask=additive_mask(allowed.to(tokens.device), dtype)).logits


def fingerprint(hf_model) -> list[float]:
    """Eight logits of the (unadapted) model on fixed tokens: which base model an adapter belongs to."""
    device = next(hf_model.parameters()).device
    tokens = torch.arange(4, device=device)[None] % int(hf_model.config.vocab_size)
    body = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    with torch.no_grad():
        return body(input_ids=tokens).logits[0, -1, :8].double().cpu().tolist()


def _clean_state(model) -> dict[str, Tensor]:
    """The wrapped model's weights under plain Hugging Face names (bridge aliases dropped later)."""
    state = {}
    for name, value in model.original_model.state_dict().items():
        state.setdefault(_WRAPPER.sub("", name), value)
    return state


def hf_copy(model, probe: Int[Tensor, "1 pos"] | None = None):
    """A plain, frozen Hugging Face copy of a TransformerBridge's model, with its weights as the bridge uses them.

    Args:
        model: a TransformerBridge (``model.original_model`` is the wrapped Hugging Face model).
        probe: tokens ``[1, pos]`` to check the copy on (default: the BOS token and a short text).

    Returns:
        The copy (eval mode, every parameter ``requires_grad=False``), on the bridge's device
        and dtype. The bridge is left as found.

    Raises:
        TypeError: ``model`` wraps no Hugging Face model (e.g. a HookedTransformer).
        ValueError: the copy does not reproduce the bridge's logits, or the architecture does
            not honour a custom 4-D attention mask.
    """
    hf = getattr(model, "original_model", None)
    if not isinstance(hf, torch.nn.Module) or not hasattr(hf, "config"):
        raise TypeError(
            f"{type(model).__name__} wraps no Hugging Face model: LoRA fine-tuning needs a TransformerBridge "
            "(tl_reversed.load_model() or TransformerBridge.boot_transformers)"
        )
    from transformers import AutoModelForCausalLM

    first = next(model.parameters())
    with untouched(model):
        config = copy.deepcopy(hf.config)
        config.tie_word_embeddings = False
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config, dtype=first.dtype, attn_implementation="eager")
        state = _clean_state(model)
        fresh = fresh.to_empty(device=first.device)
        wanted = fresh.state_dict()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ValueError(f"cannot rebuild {type(hf).__name__} from the bridge's weights: {missing[:3]} not found")
        with torch.no_grad():
            for name, tensor in wanted.items():
                tensor.copy_(state[name])
            sources = {_WRAPPER.sub("", name): buffer for name, buffer in hf.named_buffers()}
            for name, buffer in fresh.named_buffers():  # rotary frequencies and the like (not in the state dict)
                if name not in sources or sources[name].shape != buffer.shape:
                    raise ValueError(f"cannot rebuild {type(hf).__name__} from the bridge: its buffer {name!r} is not found")
                buffer.copy_(sources[name])
        fresh.eval().requires_grad_(False)
        if probe is None:
            probe = model.to_tokens("Segment masks: check the copy.")
        probe = probe.to(first.device)
        with torch.no_grad():
            own = model(probe)
            plain = fresh(input_ids=probe).logits
            try:
                masked = masked_logits(fresh, probe, causal_allowed(1, probe.shape[1], first.device))
            except (IndexError, RuntimeError, ValueError) as error:  # e.g. OPT derives positions from a 2-D mask
                raise ValueError(
                    f"{type(hf).__name__} does not accept a custom 4-D attention mask ({type(error).__name__}: "
                    f"{error}): segment masks cannot be trained on this architecture"
                ) from error
    if not torch.equal(own, plain) and not torch.allclose(own, plain, rtol=1e-5, atol=1e-5):
        raise ValueError(
            f"the Hugging Face copy of this {type(hf).__name__} does not reproduce the bridge's logits "
            f"(max difference {(own - plain).abs().max():.3g}): this architecture cannot be fine-tuned here"
        )
    if not torch.allclose(masked, plain, rtol=1e-5, atol=1e-5):
        raise ValueError(
            f"{type(hf).__name__} does not honour a custom 4-D attention mask (the 4-D causal mask changes its "
            f"logits by {(masked - plain).abs().max():.3g}): segment masks cannot be trained on this architecture"
        )
    return fresh
