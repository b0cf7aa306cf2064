"""Tiny random models for tests, benchmarks and experiments without downloads.

``tiny_model("llama")`` builds a small random Hugging Face model of that
architecture with a character-level tokenizer and wraps it in a TransformerBridge
(compatibility mode), the same path ``load_model`` takes for real checkpoints.
``tiny_hooked_model()`` builds a HookedTransformer where TransformerLens 2.x/3.x is
installed.
"""

from __future__ import annotations

import warnings

import torch

ARCHITECTURES = ("gpt2", "llama", "gemma3", "opt", "gptj", "neox")


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII, with a BOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<bos>": 0, "<unk>": 1, "<pad>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<bos>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
    )
    tokenizer.init_kwargs["name_or_path"] = "tl-reversed-char-tokenizer"
    return tokenizer


def _hf_model(arch: str, n_layers: int, d_model: int, n_heads: int, vocab: int, n_ctx: int):
    import transformers as tf

    d_head = d_model // n_heads
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=2)
    if arch == "gpt2":
        config = tf.GPT2Config(n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=n_heads, **common)
        return tf.GPT2LMHeadModel(config)
    if arch == "llama":
        config = tf.LlamaConfig(
            hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=max(1, n_heads // 2),
            max_position_embeddings=n_ctx, **common,
        )  # fmt: skip
        return tf.LlamaForCausalLM(config)
    if arch == "gemma3":
        config = tf.Gemma3TextConfig(
            hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=1, head_dim=2 * d_head,
            query_pre_attn_scalar=3 * d_head, max_position_embeddings=n_ctx, sliding_window=8, **common,
        )  # fmt: skip
        return tf.Gemma3ForCausalLM(config)
    if arch == "opt":
        config = tf.OPTConfig(
            hidden_size=d_model, ffn_dim=2 * d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
            max_position_embeddings=n_ctx, word_embed_proj_dim=d_model, **common,
        )  # fmt: skip
        return tf.OPTForCausalLM(config)
    if arch == "gptj":
        config = tf.GPTJConfig(n_embd=d_model, n_layer=n_layers, n_head=n_heads, rotary_dim=4, n_positions=n_ctx, **common)
        return tf.GPTJForCausalLM(config)
    if arch == "neox":
        config = tf.GPTNeoXConfig(
            hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, max_position_embeddings=n_ctx, **common,
        )  # fmt: skip
        return tf.GPTNeoXForCausalLM(config)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")


def tiny_model(
    arch: str = "llama",
    *,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    n_ctx: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device_map: dict[str, str] | None = None,
):
    """A small random TransformerBridge (compatibility mode, eval mode) of one architecture.

    ``device_map`` (Hugging Face module names -> devices) places the model with accelerate's
    ``dispatch_model`` before the bridge wraps it, as ``boot_transformers(..., device_map=...)``
    does for a hub model, with accelerate's device-moving hooks on every module
    (``force_hooks``). TransformerLens 4.3 refuses its weight processing on such a model, so
    it then gets ``enable_compatibility_mode(no_processing=True)`` (the same RA, the numbers
    unfolded).
    """
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = char_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf_model = _hf_model(arch, n_layers, d_model, n_heads, len(tokenizer), n_ctx)
    hf_model.config.architectures = [type(hf_model).__name__]
    hf_model = hf_model.to(dtype).eval()
    if device_map is not None:
        import accelerate

        hf_model = accelerate.dispatch_model(hf_model, device_map=device_map, force_hooks=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            f"tiny-{arch}", hf_model=hf_model, tokenizer=tokenizer, dtype=dtype
        )
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=device_map is not None)
    return bridge.eval()


def tiny_hooked_model(*, gqa: bool = True, n_layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A small random HookedTransformer (TransformerLens 2.x/3.x) with rotary attention."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=99, act_fn="gelu",
        n_key_value_heads=2 if gqa else None, positional_embedding_type="rotary",
        normalization_type="RMS", seed=seed, dtype=dtype, default_prepend_bos=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer=char_tokenizer())
    return model.eval()
