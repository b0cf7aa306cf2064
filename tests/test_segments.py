"""Segment masks (MAS): ids, masks, running and generating under them, RA under them.

Runs twice like test_core: TransformerBridge models, and with ``TL_REVERSED_LEGACY=1``
HookedTransformer models (tests marked ``bridge`` are deselected there).
"""

from __future__ import annotations

import pytest
import torch

import tl_reversed
from conftest import LEGACY, make_tiny
from tl_reversed.core.segment_generation import SegmentGeneration, generate
from tl_reversed.core.segments import (
    PAD_ID, chat_pieces, prefill_mask, segment_attention, segment_ids, tokenize_batch, tokenize_pieces,
)  # fmt: skip
from tl_reversed.core.architecture import describe
from tl_reversed.core.state import hook_count

# --------------------------------------------------------------------------- ids and masks


def test_segment_ids_number_the_pieces_in_order():
    assert segment_ids([2, 3, 1]).tolist() == [0, 0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match=r"pieces \[1\] have \[0\] tokens: every segment needs at least one token"):
        segment_ids([2, 0])


def test_prefill_mask_by_hand():
    ids = torch.tensor([[0, 0, 1, 1], [0, 1, PAD_ID, PAD_ID]])
    mask = prefill_mask(ids, total_len=6).int()
    assert mask[0].tolist() == [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    assert mask[1].tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],  # padding rows see only themselves
        [0, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # generated tokens: the whole prompt, no padding, causal after it
        [1, 1, 0, 0, 1, 1],
    ]


def test_one_segment_per_token_is_causal_and_one_segment_is_full():
    n = 7
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(prefill_mask(torch.arange(n))[0], causal)
    assert torch.equal(prefill_mask(torch.zeros(n, dtype=torch.long))[0], torch.ones(n, n, dtype=torch.bool))
    after = prefill_mask(torch.zeros(3, dtype=torch.long), total_len=n)[0]
    assert torch.equal(after[3:], causal[3:])  # positions after the prompt never see later ones


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([0, 1, 0], r"row 0: segment id goes down from 1 to 0 at position 2; segments must come in order"),
        ([[0, -1, 1]], r"row 0: padding \(id -1\) at position 1 before prompt tokens; pad on the right"),
        ([[0, 0], [-1, -1]], r"row 1 is all padding"),
        ([0.0, 1.0], r"segment ids must be integers, got torch.float32"),
        ([0, -2], r"segment ids must be >= 0 \(padding: -1\)"),
    ],
)
def test_prefill_mask_rejects_bad_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        prefill_mask(torch.tensor(ids))


def test_prefill_mask_rejects_a_short_total_len():
    with pytest.raises(ValueError, match=r"total_len=2 is shorter than the prompt \(3 positions\)"):
        prefill_mask(torch.zeros(3, dtype=torch.long), total_len=2)


def test_tokenize_pieces_and_batch():
    model = make_tiny("gpt2")
    tokens, ids = tokenize_pieces(model, ["ab", "cde"])
    assert torch.equal(tokens, model.to_tokens("abcde")[0])  # one character per token
    assert ids.tolist() == [0, 0, 0, 1, 1, 1]  # BOS joins the first segment
    tokens, ids = tokenize_pieces(model, ["ab", "cde"], prepend_bos=False)
    assert ids.tolist() == [0, 0, 1, 1, 1] and len(tokens) == 5
    batch, batch_ids = tokenize_batch(model, [["ab", "cde"], ["x", "y"]])
    assert batch_ids.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, -1, -1, -1]]
    assert torch.equal(batch[1, :3], model.to_tokens("xy")[0])
    assert batch[1, 3:].tolist() == [model.tokenizer.pad_token_id] * 3
    with pytest.raises(ValueError, match=r"pieces \[1\] \(\[''\]\) tokenize to nothing"):
        tokenize_pieces(model, ["ab", ""])
    with pytest.raises(ValueError, match=r"pieces must be a non-empty list of strings"):
        tokenize_pieces(model, "ab")


# --------------------------------------------------------------------------- running under the mask

ARCHS = ["llama", "gpt2"] if LEGACY else ["gpt2", "llama", "gemma3", "opt", "gptj"]
TEXT = "the cat sat on the mat, so"  # 27 tokens with BOS: past Gemma 3's sliding window of 8


def _logits(model, tokens, ids=None):
    if ids is None:
        return model(tokens)
    with segment_attention(model, ids):
        return model(tokens)


def _state(model) -> tuple:
    attn = [b.attn for b in model.blocks] + [getattr(b.attn, "original_component", b.attn) for b in model.blocks]
    return (
        hook_count(model),
        sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in attn),
        [p.requires_grad for p in model.parameters()],
        [p.grad for p in model.parameters()],
        [m.training for m in model.modules()],
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_one_segment_per_token_gives_the_causal_logits(arch):
    model = make_tiny(arch, dtype=torch.float64)
    tokens = model.to_tokens(TEXT)
    causal = _logits(model, tokens)
    masked = _logits(model, tokens, torch.arange(tokens.shape[1]))
    # the bridge runs the same arithmetic with our mask; a HookedTransformer's scores are recomputed
    torch.testing.assert_close(masked, causal, atol=1e-12, rtol=0)
    assert (_logits(model, tokens, torch.zeros(tokens.shape[1], dtype=torch.long)) - causal).abs().max() > 1e-3


def _full_attention_reference(model, tokens):
    """Logits with every position attending to every position, without segment_attention."""
    if LEGACY:  # HookedTransformer: the causal mask of each attention layer, replaced on the instance
        blocks = [b.attn for b in model.blocks]
        for attn in blocks:
            attn._make_causal_mask = lambda query_ctx_length, key_ctx_length, past_kv_pos_offset, device: torch.ones(
                1, 1, query_ctx_length, key_ctx_length, dtype=torch.bool, device=device
            )
        try:
            return model(tokens)
        finally:
            for attn in blocks:
                del attn._make_causal_mask
    n = tokens.shape[1]  # the wrapped Hugging Face model, given an all-zero additive 4-D mask
    return model.original_model(tokens, attention_mask=torch.zeros(1, 1, n, n, dtype=torch.float64)).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"] if LEGACY else ["gpt2", "llama", "gemma3", "gptj", "neox"])
def test_one_segment_is_the_bidirectional_prefill(arch):
    model = make_tiny(arch, dtype=torch.float64)
    tokens = model.to_tokens("a cat!")  # 7 tokens: inside Gemma 3's sliding window, where HF ignores it
    full = _logits(model, tokens, torch.zeros(tokens.shape[1], dtype=torch.long))
    torch.testing.assert_close(full, _full_attention_reference(model, tokens), atol=1e-10, rtol=0)


def _gpt2_by_hand(hf, tokens, allowed):
    """GPT-2 written out from its weights, attention limited to ``allowed`` [pos, pos]."""
    t = hf.transformer
    x = t.wte(tokens) + t.wpe(torch.arange(tokens.shape[1]))
    n_heads = hf.config.n_head
    for block in t.h:
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(x.shape[-1], dim=-1)
        q, k, v = (y.unflatten(-1, (n_heads, -1)).transpose(1, 2) for y in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + block.attn.c_proj((pattern @ v).transpose(1, 2).flatten(-2))
        x = x + block.mlp(block.ln_2(x))
    return hf.lm_head(t.ln_f(x))


@pytest.mark.bridge
def test_two_segments_match_gpt2_written_out_by_hand():
    model = make_tiny("gpt2", dtype=torch.float64)
    tokens, ids = tokenize_pieces(model, ["Be brief.", " Why?"])
    tokens = torch.cat([tokens, model.to_tokens("ok", prepend_bos=False)[0]])[None]  # two tokens after the prompt
    allowed = prefill_mask(ids, total_len=tokens.shape[1])[0]
    with torch.no_grad():
        want = _gpt2_by_hand(model.original_model, tokens, allowed)
        got = _logits(model, tokens, ids)
        causal = model(tokens)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # the bridge's softmax runs in float32
    assert (causal - want).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama"] if LEGACY else ["llama", "gemma3"])
def test_positions_after_the_prompt_never_see_later_positions(arch):
    model = make_tiny(arch, dtype=torch.float64)
    prompt, ids = tokenize_pieces(model, ["You are kind.", " Hi"])
    after = model.to_tokens(" there friend", prepend_bos=False)[0]
    tokens = torch.cat([prompt, after])[None]
    logits = _logits(model, tokens, ids)
    torch.testing.assert_close(logits[:, : len(prompt)], _logits(model, prompt[None], ids), atol=1e-12, rtol=0)
    for j in range(len(prompt), tokens.shape[1]):
        changed = tokens.clone()
        changed[0, j] = (changed[0, j] + 7) % 90 + 3
        other = _logits(model, changed, ids)
        torch.testing.assert_close(other[:, :j], logits[:, :j], atol=1e-12, rtol=0)
        assert (other[:, j] - logits[:, j]).abs().max() > 1e-6


@pytest.mark.parametrize("arch", ["llama", "gpt2"] if LEGACY else ["llama", "gpt2", "opt"])
def test_a_padded_batch_equals_one_prompt_at_a_time(arch):
    model = make_tiny(arch, dtype=torch.float64)
    prompts = [["You are kind.", " Hi"], ["Be", " brief", " now please"], ["x", "y"]]
    tokens, ids = tokenize_batch(model, prompts)
    batched = _logits(model, tokens, ids)
    for i, pieces in enumerate(prompts):
        alone, alone_ids = tokenize_pieces(model, pieces)
        n = len(alone)
        alone_logits = _logits(model, alone[None], alone_ids)[0]
        torch.testing.assert_close(batched[i, :n], alone_logits, atol=1e-6, rtol=0)  # the bridge's float32 softmax
        assert torch.isfinite(batched[i]).all()  # padding rows see themselves: no NaN


# --------------------------------------------------------------------------- state and errors


def test_the_model_is_left_as_found_also_after_an_exception():
    model = make_tiny("llama")
    tokens = model.to_tokens(TEXT)
    causal, before = model(tokens), _state(model)
    ids = torch.zeros(tokens.shape[1], dtype=torch.long)
    with segment_attention(model, ids):
        assert not torch.equal(model(tokens), causal)
    assert _state(model) == before
    torch.testing.assert_close(model(tokens), causal, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="boom"):
        with segment_attention(model, ids):
            model(tokens)
            raise RuntimeError("boom")
    assert _state(model) == before
    torch.testing.assert_close(model(tokens), causal, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"the model runs 3 positions but the segment ids cover a prompt of"):
        with segment_attention(model, ids):
            model(tokens[:, :3])
    assert _state(model) == before
    with pytest.raises(ValueError, match="already inside segment_attention"):
        with segment_attention(model, ids), segment_attention(model, ids):
            pass
    assert _state(model) == before


def test_training_under_the_mask_reaches_the_weights():
    """Nothing is frozen inside segment_attention: a loss under the mask has weight gradients."""
    model = make_tiny("llama", dtype=torch.float64)
    tokens = model.to_tokens(TEXT)
    ids = torch.zeros(tokens.shape[1], dtype=torch.long)
    weight = next(p for p in model.parameters() if p.ndim == 2)
    try:
        with segment_attention(model, ids):
            model(tokens)[0, 3].logsumexp(-1).backward()
        masked = weight.grad.clone()
        weight.grad = None
        model(tokens)[0, 3].logsumexp(-1).backward()
        assert masked.abs().max() > 0 and (masked - weight.grad).abs().max() > 1e-8  # position 3 saw later keys
    finally:
        model.zero_grad(set_to_none=True)


@pytest.mark.bridge
def test_an_attention_that_takes_no_4d_mask_gets_a_clear_error():
    model = make_tiny("opt")
    before_state = _state(model)
    config = model.blocks[0].attn.original_component.config
    before, config._attn_implementation = config._attn_implementation, "flex_attention"
    try:
        with pytest.raises(TypeError, match=r"segment masks are not supported for layer 0's attention \(AttentionBridge "
                           r"over OPTAttention, flex_attention\): it takes no 4-D attention mask"):  # fmt: skip
            with segment_attention(model, torch.zeros(3, dtype=torch.long)):
                pass
    finally:
        config._attn_implementation = before
    assert _state(model) == before_state


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", ["llama"] if LEGACY else ["llama", "gpt2"])
def test_generation_equals_a_full_recompute_under_the_same_mask(arch):
    model = make_tiny(arch, dtype=torch.float64)
    before = _state(model)
    out = generate(model, ["You are kind.", " Hi"], max_new_tokens=6, stop_at_eos=False)
    assert _state(model) == before
    p = out.prompt_length
    assert len(out.new_tokens) == 6 and out.tokens.shape[0] == p + 6
    with segment_attention(model, out.segment_ids):
        logits = model(out.tokens[None])[0].double()
    # token by token: each generated token is the argmax of one pass over the final sequence
    steps = logits[p - 1 : -1]
    assert torch.equal(steps.argmax(-1), out.new_tokens)
    want = steps.log_softmax(-1).gather(-1, out.new_tokens[:, None])[:, 0]
    torch.testing.assert_close(out.logprobs, want, atol=1e-10, rtol=0)
    # and the prefill really was segmented: the causal model's first token distribution differs
    causal = model(out.tokens[None, :p])[0, -1].double().log_softmax(-1)
    assert (causal - logits[p - 1].log_softmax(-1)).abs().max() > 1e-4
    frame = out.to_dataframe()
    assert frame["generated"].sum() == 6 and frame["segment"].tolist()[:p] == out.segment_ids.tolist()
    assert out.text == model.tokenizer.decode(out.new_tokens.tolist())


def test_generation_result_saves_loads_and_plots(tmp_path):
    model = make_tiny("llama")
    out = generate(model, ["ab", "cd"], max_new_tokens=3, stop_at_eos=False)
    back = SegmentGeneration.load(out.save(tmp_path / "gen.safetensors"))
    assert back.text == out.text and torch.equal(back.tokens, out.tokens) and back.pieces == ["ab", "cd"]
    fig = out.plot()
    ax = fig.axes[0]
    assert [round(line.get_xdata()[0], 1) for line in ax.get_lines() if line.get_xdata()[0] == line.get_xdata()[1]] == [
        2.5, 4.5
    ]  # fmt: skip  (segment 1 starts at 3: "<bos>ab" then "cd"; the prompt ends at 5)
    assert torch.equal(out.mask(), prefill_mask(out.segment_ids, total_len=8)[0])
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        generate(model, ["ab"], max_new_tokens=0)


# --------------------------------------------------------------------------- RA under the mask


def _loss_with_score_edit(model, tokens, target, ids, layer, head, q, k, delta):
    def edit(scores, hook):
        scores = scores.clone()
        scores[:, head, q, k] += delta
        return scores

    hook = (f"blocks.{layer}.attn.hook_attn_scores", edit)
    result = tl_reversed.reversed_attention(model, tokens, target, segments=ids, keep="norms", extra_hooks=[hook])
    return float(result.loss[0])


@pytest.mark.parametrize("arch", ["llama"] if LEGACY else ["gpt2", "llama"])
def test_ra_under_the_mask_equals_finite_differences_of_the_unscaled_scores(arch):
    """RA = dL/d(Q.K^T) over the allowed entries, future keys of a segment included; zero where masked.

    Layer 0 is the one whose future keys reach the loss (in the last layer only the rows
    predicting the target do), and its RA is small (~1e-5), so the step is 1e-3 (the
    difference quotient's rounding stays near 1e-13). As in test_core: the bridge's Llama
    softmax runs in float32, so a larger step and tolerance there.
    """
    model = make_tiny(arch, dtype=torch.float64)
    eps, rel = (1e-3, 1e-5) if LEGACY or arch == "gpt2" else (1e-1, 2e-3)
    tokens, ids = tokenize_pieces(model, ["Be kind.", " Why"])
    result = tl_reversed.reversed_attention(model, tokens[None], [" ok"], segments=ids)
    layer, head, q = 0, 1, 3  # a query of the first segment: keys 4..8 are its segment's future
    scale = describe(model).scales[layer]
    n = int(result.lengths[0])
    fd = torch.tensor(
        [
            (
                _loss_with_score_edit(model, tokens[None], [" ok"], ids, layer, head, q, k, eps * scale)
                - _loss_with_score_edit(model, tokens[None], [" ok"], ids, layer, head, q, k, -eps * scale)
            )
            / (2 * eps)
            for k in range(n)
        ],
        dtype=torch.float64,
    )
    row = result.maps[0, layer, head, q, :n].double()
    allowed = prefill_mask(result.segments[0, : len(ids)], total_len=n)[0, q]
    assert allowed.tolist() == [True] * 9 + [False] * (n - 9)
    assert row[4:9].abs().min() > 1e-8  # the segment's future keys get gradient
    torch.testing.assert_close(row, fd, atol=rel * row.abs().max().item(), rtol=0)
    assert (row[~allowed] == 0).all() and (fd[~allowed] == 0).all()
    # every row sums to zero over its allowed keys (and is zero elsewhere)
    maps = result.maps[0, :, :, :n, :n]
    mask = prefill_mask(result.segments[0, : len(ids)], total_len=n)[0]
    assert (maps[..., ~mask] == 0).all()
    sums = maps.sum(-1)  # to rounding: float64 maps, but the bridge's Llama pattern sums to 1 in float32
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=(1e-12 if rel < 1e-3 else 1e-6) * maps.abs().max().item(), rtol=0)
    causal = tl_reversed.reversed_attention(model, tokens[None], [" ok"])
    assert (causal.maps[0, :, :, :n, :n].triu(1) == 0).all() and (maps.triu(1) != 0).any()


def test_ra_under_the_mask_records_the_segments_and_refuses_the_bounded_path(tmp_path):
    model = make_tiny("llama")
    tokens, ids = tokenize_batch(model, [["Be kind.", " Why"], ["Hi", " you"]])
    lengths = (ids >= 0).sum(-1)
    prompts = [tokens[i, : int(n)] for i, n in enumerate(lengths)]
    batched = tl_reversed.reversed_attention(model, tokens, [" ok", " no"], segments=ids, batch_size=1, progress=False)
    for i in range(2):  # one prompt at a time, in chunks of one, gives the same maps
        alone = tl_reversed.reversed_attention(model, prompts[i][None], [[" ok", " no"][i]], segments=ids[i, : int(lengths[i])])
        n = int(alone.lengths[0])
        torch.testing.assert_close(batched.maps[i, ..., :n, :n], alone.maps[0, ..., :n, :n], atol=1e-6, rtol=0)
    assert batched.segments[1].tolist()[: int(lengths[1])] == ids[1, : int(lengths[1])].tolist()
    rows = tl_reversed.reversed_attention(model, tokens, [" ok", " no"], segments=ids, query_positions=[2, 5], path="auto")
    torch.testing.assert_close(rows.maps[:, :, :, :, :13], batched.maps[:, :, :, [2, 5], :13], atol=1e-6, rtol=0)
    back = type(batched).load(batched.save(tmp_path / "ra.safetensors"))
    assert torch.equal(back.segments, batched.segments)
    with pytest.raises(ValueError, match=r"path='bounded' does not run under a segment mask: use path='standard'"):
        tl_reversed.reversed_attention(model, prompts[0][None], [" ok"], segments=ids[0, :13], path="bounded")
    with pytest.raises(ValueError, match=r"segments row 0 has 5 ids but prompt 0 has 13 tokens"):
        tl_reversed.reversed_attention(model, prompts[0][None], [" ok"], segments=ids[0, :5])


def test_describe_head_names_a_later_key_of_the_querys_segment():
    """Under a segment mask the largest |RA| of a row can sit after the query: describe_head reports it."""
    model = make_tiny("llama")
    tokens, ids = tokenize_pieces(model, ["Be kind.", " Why"])  # query 3 sees keys 0..8 (segment 0)
    result = tl_reversed.reversed_attention(model, tokens[None], [" ok"], segments=ids, query_positions=[3])
    words = result.str_tokens[0]
    found = []
    for head in range(result.maps.shape[2]):
        row = result.head(0, head)[0]
        key = int(row.abs().argmax())
        if key > 3:
            assert key <= 8 and (row[9:] == 0).all()
            description = result.describe_head(0, head, k=1)
            assert description["query_pos"] == 3
            side = description["pushed_up"] if row[key] < 0 else description["pushed_down"]
            assert side == [(words[key], float(row[key]))]
            found.append(head)
    assert found  # this tiny model has such heads (heads 2 with key 4 when measured)


@pytest.mark.bridge  # the views alone: one model class is enough
def test_plots_and_page_of_ra_under_the_mask_show_the_segments():
    model = make_tiny("llama")
    tokens, ids = tokenize_pieces(model, ["Be kind.", " Why"])  # segment 1 starts at 9, the prompt ends at 13
    result = tl_reversed.reversed_attention(model, tokens[None], [" ok"], segments=ids)
    from tl_reversed.views.plotting import plot_head, plot_top_heads

    fig = plot_head(result, layer=0, head=1)
    ax_ra = fig.axes[1]
    shown = ax_ra.get_images()[0].get_array()
    allowed = prefill_mask(ids, total_len=int(result.lengths[0]))[0].numpy()
    assert (shown.mask == ~allowed).all()  # the segment's future keys are drawn, the hidden keys masked
    vertical = sorted(line.get_xdata()[0] for line in ax_ra.get_lines() if line.get_xdata()[0] == line.get_xdata()[1])
    assert vertical == [8.5, 12.5]
    top = plot_top_heads(result, k=2).axes[0]
    assert (top.get_images()[0].get_array().mask == ~allowed).all() and len(top.get_lines()) == 4
    page = result.to_html(heads=[(0, 1)])
    assert '"maskUpperTri":false' in page and "start at positions [9, 13]" in page
    assert page.count("border-left: 3px solid") == 2
    causal = tl_reversed.reversed_attention(model, tokens[None], [" ok"])
    assert '"maskUpperTri":true' in causal.to_html(heads=[(0, 1)]) and not plot_head(causal, 0, 1).axes[1].get_lines()


@pytest.mark.skipif(not LEGACY, reason="HookedTransformer exists only in TransformerLens 3.x: make test-legacy runs this")
def test_a_hooked_transformer_with_alibi_gets_a_clear_error():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_vocab=99,
                                  act_fn="gelu", positional_embedding_type="alibi")  # fmt: skip
    model = HookedTransformer(cfg)
    with pytest.raises(TypeError, match="segment masks are not supported on a HookedTransformer with ALiBi or log-n"):
        with segment_attention(model, torch.zeros(3, dtype=torch.long)):
            pass
    assert hook_count(model) == 0


def test_chat_pieces_cut_a_chat_template_at_the_turns():
    model = make_tiny("llama")  # a fresh model: its tokenizer's template is set here only
    model.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    messages = [{"role": "s", "content": "Be kind."}, {"role": "u", "content": "Hi?"}]
    assert chat_pieces(model, messages) == ["<s>Be kind.\n", "<u>Hi?\n<a>"]
    assert chat_pieces(model, messages, add_generation_prompt=False) == ["<s>Be kind.\n", "<u>Hi?\n"]
    model.tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match=r"the chat template renders turns 0..0 as text that does not start turns 0..1"):
        chat_pieces(model, messages)
    model.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="this model's tokenizer has no chat template: give the pieces yourself"):
        chat_pieces(model, messages)
