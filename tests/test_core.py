"""Reversed Attention core: identities, finite differences, invariances, errors, no side effects.

These tests run twice in ``make test``: against TransformerBridge models (TransformerLens
4.x) and, with ``TL_REVERSED_LEGACY=1``, against HookedTransformer models (3.x).
Tests marked ``bridge`` need bridge-only architectures and are deselected there.
"""

from __future__ import annotations

import pytest
import torch

import tl_reversed
from conftest import LEGACY, make_tiny
from tl_reversed.core.architecture import EMBED, attn_hook, describe
from tl_reversed.core.state import hook_count

PROMPT, TARGET = "The cat sat on", " mat"  # the tiny models' tokens are characters: 4 target tokens
ONE = "m"  # a one-token target, for finite differences of the last position's loss


def reference(model, prompt: str, target: str, layer: int):
    """Plain autograd with TransformerLens hooks, independent of tl_reversed's machinery.

    Returns the forward pattern, grad(hook_attn_scores), grad(hook_pattern) and the QK
    scale measured from the hooks themselves (scores / (q . k)).
    """
    prompt_tokens = model.to_tokens(prompt)
    target_ids = model.to_tokens(target, prepend_bos=False)[0]
    tokens = torch.cat([prompt_tokens, target_ids[None, :-1]], dim=1)
    start = prompt_tokens.shape[1] - 1
    names = ["pattern", "attn_scores", "rot_q", "rot_k", "q", "k"]
    fwd, grads = {}, {}

    def save(store, key):
        def hook(x, hook):
            store[key] = x.detach().clone()

        return hook

    fwd_hooks = [(attn_hook(layer, n), save(fwd, n)) for n in names if attn_hook(layer, n) in model.hook_dict]
    fwd_hooks.append((EMBED, lambda x, hook: x.detach().requires_grad_(True)))
    bwd_hooks = [(attn_hook(layer, n), save(grads, n)) for n in ("pattern", "attn_scores")]
    with model.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
        logits = model(tokens)
        logprobs = logits[0, start:].log_softmax(-1)
        loss = -logprobs.gather(-1, target_ids[:, None]).sum()
        loss.backward()
    q = fwd.get("rot_q", fwd["q"]).double()
    k = fwd.get("rot_k", fwd["k"]).double()
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    qk = torch.einsum("bqhd,bkhd->bhqk", q, k)
    tril = torch.ones(qk.shape[-2:], dtype=torch.bool).tril()
    scale = (fwd["attn_scores"].double()[..., tril] / qk[..., tril]).median().item()
    return fwd["pattern"], grads.get("attn_scores"), grads.get("pattern"), scale


ARCHS = ["llama"] if LEGACY else ["gpt2", "llama", "gemma3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_ra_equals_score_gradient_and_softmax_derivative(arch):
    model = make_tiny(arch)
    result = tl_reversed.reversed_attention(model, PROMPT, TARGET)
    for layer in range(describe(model).n_layers):
        pattern, grad_scores, grad_pattern, scale = reference(model, PROMPT, TARGET, layer)
        assert scale == pytest.approx(describe(model).scales[layer], rel=1e-5)
        ra = result.maps[0, layer]
        torch.testing.assert_close(ra, grad_scores[0].float() * scale, atol=1e-5, rtol=1e-4)
        a, g = pattern[0].float(), grad_pattern[0].float()
        softmax_derivative = a * (g - (a * g).sum(-1, keepdim=True)) * scale
        torch.testing.assert_close(ra, softmax_derivative, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result.pattern[0, layer], a, atol=1e-6, rtol=0)


def _loss_with_score_edit(model, tokens, target_id, layer, head, q, k, delta):
    def edit(scores, hook):
        scores = scores.clone()
        scores[0, head, q, k] += delta
        return scores

    with torch.no_grad(), model.hooks(fwd_hooks=[(attn_hook(layer, "attn_scores"), edit)]):
        logits = model(tokens)
    return -logits[0, -1].log_softmax(-1)[target_id].item()


@pytest.mark.parametrize("arch", ARCHS)
def test_ra_equals_finite_differences_of_unscaled_qk(arch):
    """RA is dL/d(Q.K^T): perturb one unscaled product by eps (the scores by eps * c).

    The bridge's Llama and Gemma attention computes its softmax in float32 even in a
    float64 model, so there a larger step (and tolerance) keeps float32 rounding out of
    the difference quotient; GPT-2 (and HookedTransformer) stay in float64 throughout.
    """
    model = make_tiny(arch, dtype=torch.float64)
    float64_softmax = LEGACY or arch == "gpt2"
    eps, rel = (1e-5, 1e-6) if float64_softmax else (1e-1, 2e-3)
    layer, head = 1, 3
    result = tl_reversed.reversed_attention(model, PROMPT, ONE)
    _, _, _, scale = reference(model, PROMPT, ONE, layer)
    tokens = result.tokens
    target_id = model.to_tokens(ONE, prepend_bos=False)[0, -1]
    q = tokens.shape[1] - 1
    fd = torch.tensor(
        [
            (
                _loss_with_score_edit(model, tokens, target_id, layer, head, q, k, eps * scale)
                - _loss_with_score_edit(model, tokens, target_id, layer, head, q, k, -eps * scale)
            )
            / (2 * eps)
            for k in range(q + 1)
        ],
        dtype=torch.float64,
    )
    ra_row = result.maps[0, layer, head, q, : q + 1].double()
    assert ra_row.abs().max() > 1e-4  # a row with signal, not a trivially zero one
    torch.testing.assert_close(ra_row, fd, atol=rel * ra_row.abs().max().item(), rtol=0)


@pytest.mark.bridge
@pytest.mark.parametrize("arch", ["opt", "gptj"])
def test_ra_on_delegated_attention_matches_finite_differences(arch):
    """Where the bridge delegates attention to Hugging Face, hook_pattern cannot be edited:
    check G = dL/dA by perturbing the pattern through hook_z (z += eps * v_k) instead."""
    model = make_tiny(arch, dtype=torch.float64)
    spec = describe(model)
    assert not spec.pattern_editable
    assert spec.scales[0] == pytest.approx(spec.d_head**-0.5)
    layer, head = 1, 2
    result = tl_reversed.reversed_attention(model, PROMPT, ONE)
    tokens = result.tokens
    target_id = model.to_tokens(ONE, prepend_bos=False)[0, -1]
    q = tokens.shape[1] - 1
    values = {}

    def loss_with(k, delta):
        def keep_v(v, hook):
            values["v"] = v

        def edit_z(z, hook):
            z = z.clone()
            z[0, q, head] += delta * values["v"][0, k, head * spec.n_kv_heads // spec.n_heads]
            return z

        hooks = [(attn_hook(layer, "v"), keep_v), (attn_hook(layer, "z"), edit_z)]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(tokens)
        return -logits[0, -1].log_softmax(-1)[target_id].item()

    eps = 1e-5
    g = torch.tensor([(loss_with(k, eps) - loss_with(k, -eps)) / (2 * eps) for k in range(q + 1)], dtype=torch.float64)
    a = result.pattern[0, layer, head, q, : q + 1].double()
    expected = a * (g - (a * g).sum()) * spec.scales[layer]
    torch.testing.assert_close(result.maps[0, layer, head, q, : q + 1].double(), expected, atol=1e-8, rtol=1e-5)


def test_ra_is_lower_triangular_with_zero_row_sums(tiny):
    result = tl_reversed.reversed_attention(tiny, ["a longer prompt here", "short"], [" x", " yz"])
    maps = result.maps
    assert maps.abs().max() > 1e-4
    assert maps.triu(1).abs().max().item() == 0.0
    assert maps.sum(-1).abs().max().item() < 1e-7


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_with_padding_equals_one_at_a_time(arch):
    model = make_tiny(arch)
    prompts = ["The quick brown fox", "Hi", "Jumps over the lazy", "dog and cat"]
    targets = [" jumps", " there!", " dog", "s"]
    batched = tl_reversed.reversed_attention(model, prompts, targets, batch_size=None)
    assert len(set(batched.lengths.tolist())) > 1
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        alone = tl_reversed.reversed_attention(model, prompt, target)
        n = int(alone.lengths[0])
        assert int(batched.lengths[i]) == n
        torch.testing.assert_close(batched.maps[i, :, :, :n, :n], alone.maps[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched.norms[i], alone.norms[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched.loss[i], alone.loss[0], atol=1e-5, rtol=1e-5)
        assert batched.maps[i, :, :, n:, :].abs().sum().item() == 0.0
    small_batches = tl_reversed.reversed_attention(model, prompts, targets, batch_size=3)
    torch.testing.assert_close(small_batches.maps, batched.maps, atol=1e-5, rtol=1e-4)


def test_multi_token_target_is_the_sum_of_per_token_maps(tiny):
    prompt, target = "Once upon a", " time"
    full = tl_reversed.reversed_attention(tiny, prompt, target)
    target_ids = tiny.to_tokens(target, prepend_bos=False)[0]
    assert target_ids.numel() > 1
    start = int(tiny.to_tokens(prompt).shape[1]) - 1

    def token_loss(t):
        def metric(logits, tokens):
            return -logits[:, start + t].log_softmax(-1)[:, target_ids[t]]

        return metric

    per_token = [tl_reversed.reversed_attention(tiny, full.tokens, metric=token_loss(t)) for t in range(target_ids.numel())]
    summed = torch.stack([r.maps for r in per_token]).sum(0)
    torch.testing.assert_close(full.maps, summed, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(full.loss, sum(r.loss for r in per_token), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_loss_unembeds_only_the_target_positions(arch):
    """The target loss reads ``[target tokens, 1, vocab]`` logits: the full-logits loss and RA, less work."""
    from tl_reversed.core.engine import positions_hook
    from tl_reversed.core.inputs import target_loss, target_positions, tokenize

    model = make_tiny(arch)
    prompts, targets = ["The quick brown fox", "Hi", "Jumps over the lazy"], [" jumps", " there!", " dog"]
    batch = tokenize(model, prompts, targets, describe(model), need_targets=True)
    rows, cols = target_positions(batch)
    assert rows.tolist() == [i for i, t in enumerate(batch.targets) for _ in range(t.numel())]
    assert cols.tolist() == [int(n) - 1 + j for n, t in zip(batch.prompt_lengths, batch.targets) for j in range(t.numel())]
    hook = positions_hook(model, cols, rows)
    assert hook is not None
    with torch.no_grad():
        full = model(batch.tokens)
        picked = model.run_with_hooks(batch.tokens, fwd_hooks=[hook])
    assert picked.shape == (rows.numel(), 1, model.cfg.d_vocab)
    torch.testing.assert_close(target_loss(picked, batch, picked=True), target_loss(full, batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one row per target token"):
        target_loss(full, batch, picked=True)

    # reversed_attention's default loss against the same loss from the full logits, as a metric
    one = tokenize(model, prompts[0], targets[0], describe(model), need_targets=True)
    default = tl_reversed.reversed_attention(model, prompts[0], targets[0])
    from_full = tl_reversed.reversed_attention(model, default.tokens, metric=lambda logits, tokens: target_loss(logits, one))
    torch.testing.assert_close(default.maps, from_full.maps, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(default.loss, from_full.loss, atol=1e-5, rtol=1e-5)
    assert hook_count(model) == 0


def test_metric_of_logit_difference_is_linear(tiny):
    """A custom metric works and RA is linear in it: RA(a - b) = RA(a) - RA(b)."""
    a_id, b_id = (tiny.to_tokens(t, prepend_bos=False)[0, 0] for t in ("x", "y"))

    def logit(token_id, sign=1.0):
        return lambda logits, tokens: sign * logits[:, -1, token_id]

    diff = tl_reversed.reversed_attention(tiny, PROMPT, metric=lambda lg, tk: lg[:, -1, a_id] - lg[:, -1, b_id])
    a = tl_reversed.reversed_attention(tiny, PROMPT, metric=logit(a_id))
    b = tl_reversed.reversed_attention(tiny, PROMPT, metric=logit(b_id))
    torch.testing.assert_close(diff.maps, a.maps - b.maps, atol=1e-6, rtol=1e-5)


def test_keep_norms_matches_maps(tiny):
    prompts, targets = ["one two three", "four"], [" a", " b"]
    maps = tl_reversed.reversed_attention(tiny, prompts, targets)
    norms = tl_reversed.reversed_attention(tiny, prompts, targets, keep="norms")
    assert norms.maps is None and norms.pattern is None
    torch.testing.assert_close(norms.norms, maps.maps.flatten(-2).norm(dim=-1))
    torch.testing.assert_close(norms.pattern_norms, maps.pattern.flatten(-2).norm(dim=-1))


def test_layers_subset_matches_full_run(tiny):
    full = tl_reversed.reversed_attention(tiny, PROMPT, TARGET)
    one = tl_reversed.reversed_attention(tiny, PROMPT, TARGET, layers=[1])
    assert one.layers == [1]
    torch.testing.assert_close(one.maps[:, 0], full.maps[:, 1])
    torch.testing.assert_close(one.head(1, 2), full.head(1, 2))


def test_top_heads_and_dataframe_agree(tiny):
    result = tl_reversed.reversed_attention(tiny, ["abc", "defg"], [" h", " i"])
    mean = result.norms.mean(0)
    layer, head = result.top_heads(1)[0]
    assert mean[layer, head] == mean.max()
    df = result.to_dataframe()
    assert len(df) == 2 * mean.numel()
    by_head = df.groupby(["layer", "head"]).ra_norm.mean()
    assert by_head.idxmax() == (layer, head)
    info = result.describe_head(layer, head)
    row = result.head(layer, head)[info["query_pos"]]
    assert all(v < 0 for _, v in info["pushed_up"]) and all(v > 0 for _, v in info["pushed_down"])
    assert info["pushed_up"][0][1] == pytest.approx(row.min().item())
    floor = 0.01 * row[: info["query_pos"] + 1].abs().max().item()
    assert all(abs(v) > floor for _, v in info["pushed_up"] + info["pushed_down"])
    everything = result.describe_head(layer, head, k=100, min_share=0.0)
    kept = sum(1 for v in row[: info["query_pos"] + 1].tolist() if v != 0)
    assert len(everything["pushed_up"]) + len(everything["pushed_down"]) == kept


def test_token_prompts_equal_string_prompts(tiny):
    text = tl_reversed.reversed_attention(tiny, PROMPT, TARGET)
    tokens = tl_reversed.reversed_attention(tiny, tiny.to_tokens(PROMPT), TARGET)
    torch.testing.assert_close(tokens.maps, text.maps)


def test_half_precision_accumulates_in_float32():
    reference_model = make_tiny("llama")
    half = make_tiny("llama", dtype=torch.bfloat16)
    exact = tl_reversed.reversed_attention(reference_model, PROMPT, TARGET)
    approx = tl_reversed.reversed_attention(half, PROMPT, TARGET)
    assert approx.maps.dtype == torch.float32
    assert torch.isfinite(approx.maps).all()
    cosine = torch.nn.functional.cosine_similarity(approx.maps.flatten(), exact.maps.flatten(), dim=0)
    assert cosine > 0.99


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nan_gradient_raises_and_leaves_no_state(tiny):
    inject = [(attn_hook(1, "z"), lambda z, hook: _NanGrad.apply(z))]
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        tl_reversed.reversed_attention(tiny, PROMPT, TARGET, extra_hooks=inject)
    assert hook_count(tiny) == 0


def test_non_finite_loss_raises(tiny):
    with pytest.raises(FloatingPointError, match="not finite"):
        tl_reversed.reversed_attention(tiny, PROMPT, metric=lambda logits, tokens: logits[:, -1, 0] * float("inf"))


def _state(model):
    return (
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def test_no_state_left_after_success_or_failure(tiny):
    tiny.train()
    params = list(tiny.parameters())
    params[0].requires_grad_(False)
    params[1].grad = torch.full_like(params[1], 0.5)
    before = _state(tiny)

    def exploding_metric(logits, tokens):
        raise RuntimeError("boom inside the metric")

    with pytest.raises(RuntimeError, match="boom"):
        tl_reversed.reversed_attention(tiny, PROMPT, metric=exploding_metric)
    for call in (
        lambda: tl_reversed.reversed_attention(tiny, PROMPT, TARGET),
        lambda: tl_reversed.cache_with_grads(tiny, PROMPT, TARGET),
    ):
        call()
        after = _state(tiny)
        assert after[0] == before[0] and after[2] == before[2]
        assert [g is None for g in after[1]] == [g is None for g in before[1]]
        torch.testing.assert_close(after[1][1], before[1][1])
        assert hook_count(tiny) == 0


def test_ra_from_cache_equals_reversed_attention(tiny):
    cache = tl_reversed.cache_with_grads(tiny, PROMPT, TARGET)
    direct = tl_reversed.reversed_attention(tiny, PROMPT, TARGET)
    cached = tl_reversed.ra_from_cache(cache, tokens=direct.tokens)
    torch.testing.assert_close(cached.maps, direct.maps, atol=1e-6, rtol=1e-5)
    assert cached.str_tokens == direct.str_tokens


def test_cache_of_the_unembedding_keeps_every_position(tiny):
    """Hooks on the unembedding see full-width tensors: the default loss trims positions only when none does."""
    names = ["unembed.hook_in", "unembed.hook_out"]
    cache = tl_reversed.cache_with_grads(tiny, PROMPT, TARGET, names_filter=names)
    direct = tl_reversed.reversed_attention(tiny, PROMPT, TARGET)
    width = direct.tokens.shape[1]
    assert cache["unembed.hook_in"].shape == cache["unembed.hook_in_grad"].shape == (1, width, tiny.cfg.d_model)
    assert cache["unembed.hook_out"].shape == (1, width, tiny.cfg.d_vocab)
    with torch.no_grad():
        torch.testing.assert_close(cache["unembed.hook_out"], tiny(direct.tokens), atol=1e-5, rtol=1e-5)
    # positions after the last target token get no gradient; the target positions do
    start = int(tiny.to_tokens(PROMPT).shape[1]) - 1
    grad_norms = cache["unembed.hook_in_grad"][0].norm(dim=-1)
    assert bool((grad_norms[start:] > 0).all()) and float(grad_norms[:start].abs().max()) == 0.0
    torch.testing.assert_close(tl_reversed.ra_from_cache(cache, tokens=direct.tokens).maps, direct.maps, atol=1e-6, rtol=1e-5)


def test_ra_from_run_with_cache_incl_bwd(tiny):
    """A cache from TransformerLens' own run_with_cache(incl_bwd=True) gives the RA of the mean LM loss."""
    tokens = tiny.to_tokens(PROMPT)
    _, cache = tiny.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    for p in tiny.parameters():
        p.grad = None

    def mean_lm_loss(logits, toks):
        logprobs = logits[:, :-1].log_softmax(-1).gather(-1, toks[:, 1:, None])[..., 0]
        return -logprobs.mean(-1)

    direct = tl_reversed.reversed_attention(tiny, tokens, metric=mean_lm_loss)
    cached = tl_reversed.ra_from_cache(cache, tiny)
    torch.testing.assert_close(cached.maps, direct.maps, atol=1e-6, rtol=1e-4)


def test_ra_from_cache_without_gradients_says_how(tiny):
    _, cache = tiny.run_with_cache(tiny.to_tokens(PROMPT))
    with pytest.raises(ValueError, match="incl_bwd=True"):
        tl_reversed.ra_from_cache(cache, tiny)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(prompts="", targets=" x"), ValueError, "prompt 0 is empty"),
        (dict(prompts="abc", targets=""), ValueError, "target 0 is empty"),
        (dict(prompts=["abc", "de"], targets=[" x"]), ValueError, "2 prompts but 1 targets"),
        (dict(prompts="abc"), ValueError, "no targets given"),
        (dict(prompts="a" * 300, targets=" x"), ValueError, "longer than the model's context"),
        (dict(prompts="abc", targets=" x", layers=[7]), ValueError, r"layers \[7\] out of range"),
        (dict(prompts="abc", targets=" x", keep="everything"), ValueError, "keep must be one of"),
        (dict(prompts=3, targets=" x"), TypeError, "prompts must be a string"),
        (dict(prompts="abc", targets=" x", batch_size=0), ValueError, "batch_size must be at least 1"),
    ],
)
def test_bad_input_gives_clear_errors(tiny, kwargs, error, match):
    with pytest.raises(error, match=match):
        tl_reversed.reversed_attention(tiny, **kwargs)
    assert hook_count(tiny) == 0


@pytest.mark.parametrize("not_a_model", [object(), torch.nn.Linear(2, 2)])
def test_not_a_hooked_model_is_a_type_error(not_a_model):
    with pytest.raises(TypeError, match="expected a TransformerLens model"):
        tl_reversed.reversed_attention(not_a_model, "abc", " x")
