"""Issue 14's evidence tools: agreement with a reference ranking, the zero-ablation estimate, sparsity."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import LEGACY, make_tiny
from test_ranking import CORRUPT, PROMPTS, TARGETS, p_target

from tl_reversed import reversed_attention
from tl_reversed.commands.perturbation import agreement_table
from tl_reversed.core.architecture import attn_hook, describe
from tl_reversed.core.engine import run
from tl_reversed.core.results import load_result
from tl_reversed.core.state import hook_count
from tl_reversed.experiments.agreement import Agreement, average_ranks, resolve_k, spearman
from tl_reversed.experiments.evaluation import prompt_batch, target_probs
from tl_reversed.experiments.mediation import ZeroAblationAttribution
from tl_reversed.experiments.sparsity import Sparsity, causal_mask, hoyer, sparsity, top_mass_share
from tl_reversed.ranking import HeadScores, agreement, head_scores, ra_and_atp0

# --------------------------------------------------------------------------- agreement


def scores(values, method="m"):
    return HeadScores(torch.tensor(values, dtype=torch.float32).reshape(2, 4), method)


def test_identical_rankings_agree_fully_and_reversed_ones_not_at_all():
    ref = scores([8, 7, 6, 5, 4, 3, 2, 1], "cm1")
    same = scores([80, 70, 60, 50, 40, 30, 20, 10], "same")  # another scale, the same order
    flipped = scores([1, 2, 3, 4, 5, 6, 7, 8], "flipped")
    result = agreement({"same": same, "flipped": flipped}, ref, ks=(2, "50%"))
    assert result.ks == [2, 4] and result.reference == "cm1"
    assert result.spearman.tolist() == pytest.approx([1.0, -1.0])
    assert result.recall.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    frame = result.to_dataframe()
    assert list(frame.columns) == ["method", "reference", "spearman", "recall@2", "recall@50%"]
    assert frame["method"].tolist() == ["same", "flipped"]


def test_one_ranking_is_named_by_its_method():
    ref = scores([8, 7, 6, 5, 4, 3, 2, 1], "cm1")
    result = agreement(scores([8, 7, 6, 1, 4, 3, 2, 5], "ra"), ref, ks=(3,))
    assert result.methods == ["ra"]
    assert float(result.recall[0, 0]) == pytest.approx(3 / 3)  # heads 0, 1, 2 lead both
    result = agreement(scores([8, 7, 1, 6, 4, 3, 2, 5], "ra"), ref, ks=(3,))
    assert float(result.recall[0, 0]) == pytest.approx(2 / 3)  # head 2 (6 in the reference) left the top 3


def test_ties_share_their_average_rank():
    assert average_ranks(torch.tensor([3.0, 1.0, 1.0, 2.0])).tolist() == [4.0, 1.5, 1.5, 3.0]
    a, b = torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    ra, rb = torch.tensor([1.5, 1.5, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    assert spearman(a, b) == pytest.approx(float((ra * rb).sum() / (ra.norm() * rb.norm())))
    assert math.isnan(spearman(torch.ones(4), b))  # no order, no correlation


def test_recall_breaks_ties_by_layer_then_head():
    ref = scores([8, 7, 6, 5, 4, 3, 2, 1], "cm1")
    flat = scores([1] * 8, "flat")  # every head tied: its top 2 are heads (0, 0) and (0, 1)
    assert float(agreement(flat, ref, ks=(2,)).recall[0, 0]) == 1.0
    assert float(agreement(scores([1] * 8), scores([1, 2, 3, 4, 5, 6, 7, 8]), ks=(2,)).recall[0, 0]) == 0.0


def test_k_and_shapes_are_checked(tmp_path):
    assert resolve_k("10%", 270) == 27 and resolve_k("10%", 8) == 1 and resolve_k(10, 270) == 10
    with pytest.raises(ValueError, match="K must be a number of heads from 1 to 8"):
        resolve_k(10, 8)
    with pytest.raises(ValueError, match="between 0% and 100%"):
        resolve_k("ten%", 8)
    with pytest.raises(ValueError, match="compare rankings of one model"):
        agreement(HeadScores(torch.zeros(3, 4), "x"), scores([1] * 8), ks=(1,))
    result = agreement(scores([1, 2, 3, 4, 5, 6, 7, 8]), scores([8, 7, 6, 5, 4, 3, 2, 1]), ks=(1,))
    back = load_result(result.save(tmp_path / "agreement.safetensors"))
    assert isinstance(back, Agreement) and back.to_dataframe().equals(result.to_dataframe())


def test_the_cli_agreement_table_compares_every_method_with_cm1():
    rows = []
    for method, values in {"cm1": [8, 7, 6, 5, 4, 3, 2, 1], "ra": [1, 2, 3, 4, 5, 6, 7, 8], "index": [8, 7, 6, 5, 4, 3, 2, 1]}.items():
        for i, v in enumerate(values):
            rows.append({"task": "t", "shots": 1, "method": method, "layer": i // 4, "head": i % 4, "score": v, "rank": 0})
    table = agreement_table(pd.DataFrame(rows))
    assert table["method"].tolist() == ["ra", "index"]
    assert table["spearman"].tolist() == pytest.approx([-1.0, 1.0])
    assert table["recall@10%"].tolist() == [0.0, 1.0] and "recall@10" not in table  # 10 > 8 heads: left out
    assert agreement_table(pd.DataFrame(rows[8:])) is None  # no cm1, no table


# --------------------------------------------------------------------------- zero-ablation attribution


def scaled_head_derivative(model, layer, head):
    """d p(target) / d alpha at alpha = 1 for hook_z[:, :, head] * alpha, summed over examples, by autograd."""
    alpha = torch.ones((), dtype=torch.float64, requires_grad=True)

    def scale(z, hook):
        factor = torch.ones(z.shape[2], dtype=z.dtype)
        factor = factor + torch.nn.functional.one_hot(torch.tensor(head), z.shape[2]).to(z.dtype) * (alpha.to(z.dtype) - 1)
        return z * factor[:, None]

    total = 0.0
    with model.hooks(fwd_hooks=[(attn_hook(layer, "z"), scale)]):
        for prompt, target in zip(PROMPTS, TARGETS):
            logits = model(model.to_tokens(prompt))[0, -1]
            total = total + logits.softmax(-1)[model.to_tokens(target, prepend_bos=False)[0, 0]]
    (grad,) = torch.autograd.grad(total, alpha)
    return float(grad) / len(PROMPTS)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_atp0_is_the_derivative_of_p_along_each_heads_output(arch):
    model = make_tiny(arch, dtype=torch.float64)
    spec = describe(model)
    before = hook_count(model)
    result = head_scores(model, (PROMPTS, TARGETS), "atp0", batch_size=3, progress=False)
    assert hook_count(model) == before and all(p.grad is None for p in model.parameters())
    expected = torch.tensor(
        [[scaled_head_derivative(model, layer, head) for head in range(spec.n_heads)] for layer in range(spec.n_layers)]
    )
    assert expected.abs().max() > 1e-6  # the heads matter: the comparison is not 0 == 0
    torch.testing.assert_close(result.scores, expected.float(), rtol=1e-5, atol=1e-12)
    assert result.method == "atp0" and result.n_examples == 4
    assert result.baseline == pytest.approx(float(p_target(model, PROMPTS, TARGETS).mean()), rel=1e-6)


def test_ra_and_atp0_come_from_one_pass_and_equal_the_separate_methods():
    model = make_tiny("llama", dtype=torch.float64)
    ra, atp0 = ra_and_atp0(model, (PROMPTS, TARGETS), batch_size=3, progress=False)
    torch.testing.assert_close(ra.scores, head_scores(model, (PROMPTS, TARGETS), "ra", progress=False).scores)
    torch.testing.assert_close(atp0.scores, head_scores(model, (PROMPTS, TARGETS), "atp0", progress=False).scores,
                               rtol=1e-5, atol=1e-12)  # fmt: skip
    assert (ra.method, atp0.method) == ("ra", "atp0") and atp0.info["shared_pass"]


def sink_estimate(model, metric=None, extra_hooks=()):
    spec = describe(model)
    batch = prompt_batch(model, (PROMPTS, TARGETS), spec)
    sink = ZeroAblationAttribution(spec, len(batch), metric=metric)
    run(model, batch, [sink], metric=sink.metric, batch_size=2, same_length=False, extra_hooks=extra_hooks, progress=False)
    return sink.finish()[0]


def test_atp0_is_zero_for_a_silent_head_and_linear_in_the_metric():
    model = make_tiny("gpt2", dtype=torch.float64)
    silence = (attn_hook(1, "z"), lambda z, hook: z * torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=z.dtype)[:, None])
    estimate = sink_estimate(model, extra_hooks=[silence])
    assert float(estimate[1, 1]) == 0.0 and estimate[1, [0, 2, 3]].abs().min() > 0

    def p(logits, sub):
        return target_probs(logits[torch.arange(len(sub)), sub.last], sub)

    torch.testing.assert_close(sink_estimate(model, metric=lambda logits, sub: 3.0 * p(logits, sub)), 3.0 * sink_estimate(model))


def test_atp0_needs_a_known_gradient():
    with pytest.raises(ValueError, match="of must be 'metric'"):
        ZeroAblationAttribution(describe(make_tiny("gpt2")), 2, of="loss")


# --------------------------------------------------------------------------- sparsity


def test_a_one_hot_map_is_fully_sparse_and_a_flat_one_not_at_all():
    n = 6
    mask = causal_mask(torch.tensor([n]), n)
    one_hot = torch.zeros(1, n, n)
    one_hot[0, 4, 2] = -3.0  # sign does not matter: absolute mass
    assert float(hoyer(one_hot, mask)[0]) == pytest.approx(1.0)
    assert float(top_mass_share(one_hot, mask)[0]) == pytest.approx(1.0)
    flat = torch.full((1, n, n), 0.5)  # equal on every causal entry (and junk above the diagonal)
    entries = n * (n + 1) // 2
    assert float(hoyer(flat, mask)[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(top_mass_share(flat, mask, 0.05)[0]) == pytest.approx(math.ceil(0.05 * entries) / entries)


def test_uniform_attention_has_its_formula_values():
    n = 8
    rows = [[1.0 / (q + 1)] * (q + 1) for q in range(n)]  # query q attends evenly to keys 0..q
    values = sorted((v for row in rows for v in row), reverse=True)
    m = len(values)
    l1, l2 = sum(values), math.sqrt(sum(v * v for v in values))
    expected_hoyer = (math.sqrt(m) - l1 / l2) / (math.sqrt(m) - 1)
    expected_top = sum(values[: math.ceil(0.05 * m)]) / l1
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    mask = causal_mask(torch.tensor([n]), n)
    assert float(hoyer(uniform[None], mask)[0]) == pytest.approx(expected_hoyer)
    assert float(top_mass_share(uniform[None], mask)[0]) == pytest.approx(expected_top)


def test_entries_above_the_diagonal_and_on_padding_are_ignored():
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 5, 5)
    lengths = torch.tensor([5, 3])
    mask = causal_mask(lengths, 5)
    junk = maps + 100.0 * (~mask[:, None]).float()
    torch.testing.assert_close(hoyer(junk, mask), hoyer(maps, mask))
    torch.testing.assert_close(top_mass_share(junk, mask), top_mass_share(maps, mask))
    short = maps[1, :, :3, :3]  # the second row alone, unpadded
    torch.testing.assert_close(hoyer(maps, mask)[1], hoyer(short[None], causal_mask(torch.tensor([3]), 3))[0])


def test_sparsity_of_a_result_measures_each_ra_and_attention_map(tmp_path):
    model = make_tiny("llama")
    result = reversed_attention(model, PROMPTS[:2], TARGETS[:2], progress=False)
    measured = sparsity(result)
    assert measured.ra_top.shape == (2, 2, 4)
    n = int(result.lengths[1])
    one = causal_mask(torch.tensor([n]), n)
    assert float(measured.ra_hoyer[1, 1, 2]) == pytest.approx(float(hoyer(result.head(1, 2, 1)[None], one)[0]), rel=1e-5)
    assert float(measured.fa_top[1, 0, 3]) == pytest.approx(float(top_mass_share(result.head_pattern(0, 3, 1)[None], one)[0]), rel=1e-5)
    summary = measured.summary().set_index("measure")
    assert summary.loc["hoyer", "ra_sparser_pairs"] == int((measured.ra_hoyer > measured.fa_hoyer).sum())
    assert summary.loc["hoyer", "pairs"] == 16 and summary.loc["top_mass", "heads"] == 8
    frame = measured.to_dataframe()
    row = frame[(frame["example"] == 1) & (frame["layer"] == 1) & (frame["head"] == 2)]
    assert len(frame) == 16 and row["ra_hoyer"].item() == pytest.approx(float(measured.ra_hoyer[1, 1, 2]))
    back = load_result(measured.save(tmp_path / "sparsity.safetensors"))
    assert isinstance(back, Sparsity) and torch.equal(back.ra_top, measured.ra_top)
    with pytest.raises(ValueError, match="keep='maps'"):
        sparsity(reversed_attention(model, PROMPTS[:2], TARGETS[:2], keep="norms", progress=False))


# --------------------------------------------------------------------------- faster causal mediation


def sweep_scores(model, stacked, examples, drop=True, batch_size=3, resume=True):
    """CM1 through the SweepHeads sink, stacked (resumed at each layer or not) or by TransformerLens' sweep."""
    from transformer_lens.patching import layer_head_vector_patch_setter

    from tl_reversed.experiments.mediation import SweepHeads

    spec = describe(model)
    batch = prompt_batch(model, examples, spec)
    zeros = torch.zeros(1, 1, spec.n_heads, 1)
    cache = {attn_hook(layer, "z"): zeros for layer in range(spec.n_layers)}
    sink = SweepHeads(
        model, spec, cache, lambda sub: layer_head_vector_patch_setter, drop=drop, stacked=stacked, resume=resume
    )
    run(model, batch, [sink], backward=False, batch_size=batch_size, progress=False)
    return sink.finish()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_the_stacked_cm_sweep_equals_transformer_lens_sweep(arch, monkeypatch):
    from tl_reversed.experiments import mediation

    model = make_tiny(arch)
    before = hook_count(model)
    old, old_base = sweep_scores(model, False, (PROMPTS, TARGETS))
    new, new_base = sweep_scores(model, True, (PROMPTS, TARGETS))
    assert old.abs().max() > 1e-5  # the heads matter
    torch.testing.assert_close(new, old, atol=1e-6, rtol=0)
    from_embeddings, _ = sweep_scores(model, True, (PROMPTS, TARGETS), resume=False)  # every block run
    torch.testing.assert_close(new, from_embeddings, atol=1e-6, rtol=0)
    assert new_base == pytest.approx(old_base, abs=1e-6)
    monkeypatch.setattr(mediation, "STACKED_ROWS", 5)  # one head per forward for 3-row chunks: the same scores
    split, _ = sweep_scores(model, True, (PROMPTS, TARGETS))
    torch.testing.assert_close(split, new, atol=1e-6, rtol=0)
    assert hook_count(model) == before


RESUME_ARCHS = ["llama"] if LEGACY else ["gpt2", "llama", "gemma3", "opt", "gptj"]


@pytest.mark.parametrize("arch", RESUME_ARCHS)
def test_a_forward_resumed_at_any_layer_equals_the_full_forward(arch):
    """Patched copies run from each layer's cached input give the full patched forward's logits."""
    from tl_reversed.core.engine import forward_last
    from tl_reversed.core.resume import Resume

    model = make_tiny(arch, n_layers=3)
    spec = describe(model)
    batch = prompt_batch(model, (PROMPTS, TARGETS), spec)
    before = hook_count(model), [len(block._forward_pre_hooks) for block in model.blocks]
    start = Resume.capture(model, spec, batch)
    assert start.ok
    stacked = batch.rows([row for _ in range(2) for row in range(len(batch))])
    b = len(batch)
    for layer in range(spec.n_layers):

        def zero_head(z, hook):  # head 1 zeroed in the second copy only
            z = z.clone()
            z[b:, :, 1] = 0.0
            return z

        hooks = [(attn_hook(layer, "z"), zero_head)]
        full = forward_last(model, stacked, hooks)
        resumed = start.last_logits(layer, 2, hooks)
        assert (full[b:] - full[:b]).abs().max() > 1e-4  # the patch matters
        torch.testing.assert_close(resumed, full, atol=1e-5, rtol=0)
    assert (hook_count(model), [len(block._forward_pre_hooks) for block in model.blocks]) == before


@pytest.mark.bridge  # block replay is the TransformerBridge path; a HookedTransformer has start_at_layer
def test_a_bridge_whose_blocks_do_not_replay_falls_back_to_full_forwards(monkeypatch):
    from tl_reversed.core import resume
    from tl_reversed.core.resume import Resume

    model = make_tiny("llama")
    spec = describe(model)
    batch = prompt_batch(model, (PROMPTS, TARGETS), spec)
    # replaying without the rotary position embeddings cannot reproduce the forward: the check sees it
    monkeypatch.setattr(resume, "_CACHE_KWARGS", (*resume._CACHE_KWARGS, "position_embeddings"))
    assert not Resume.capture(model, spec, batch).ok
    with pytest.warns(UserWarning, match="runs all layers"):
        fallback, _ = sweep_scores(model, True, (PROMPTS, TARGETS))
    monkeypatch.undo()
    resumed, _ = sweep_scores(model, True, (PROMPTS, TARGETS))
    torch.testing.assert_close(fallback, resumed, atol=1e-6, rtol=0)


def test_cm1_and_cm2_scores_are_the_same_resumed_at_each_layer_or_run_from_the_embeddings(monkeypatch):
    from tl_reversed.experiments import mediation

    model = make_tiny("llama", n_layers=3)
    methods = ("cm1", "cm2")

    def scores(method):
        return head_scores(model, (PROMPTS, TARGETS), method, corrupted=(CORRUPT, TARGETS), batch_size=3, progress=False).scores

    resumed = {m: scores(m) for m in methods}
    original = mediation._stacked_sweep
    monkeypatch.setattr(mediation, "_stacked_sweep", lambda *args, **kwargs: original(*args, **{**kwargs, "resume": False}))
    for m in methods:
        every_block = scores(m)
        assert every_block.abs().max() > 1e-5
        torch.testing.assert_close(resumed[m], every_block, atol=1e-6, rtol=0)


def test_cm1_and_cm2_default_to_the_stacked_sweep_and_match_a_hand_loop():
    model = make_tiny("llama")
    spec = describe(model)
    result = head_scores(model, (PROMPTS, TARGETS), "cm1", batch_size=3, progress=False)
    base = p_target(model, PROMPTS, TARGETS)
    ablated = p_target(model, PROMPTS, TARGETS, [(attn_hook(1, "z"), lambda z, hook: z * torch.tensor([1.0, 1.0, 0.0, 1.0])[:, None])])
    assert float(result.scores[1, 2]) == pytest.approx(float((base - ablated).mean()), abs=1e-6)
    assert result.scores.shape == (spec.n_layers, spec.n_heads)
