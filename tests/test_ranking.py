"""Head rankings: each method against a hand-written reference on tiny models."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from conftest import make_tiny

from tl_reversed import reversed_attention
from tl_reversed.core.architecture import EMBED, attn_hook, describe
from tl_reversed.ranking import METHODS, HeadScores, head_scores, register, registered, shuffled_labels
from tl_reversed.core.state import hook_count
from tl_reversed.tasks import Example, ExampleSet, icl_prompt, make_examples, relation_prompt

# Character-level tiny models: one-character targets are one token.
PROMPTS = ["Q: cat\nA: dog\n\nQ: sun\nA:", "Q: red\nA: big\n\nQ: one\nA:", "Q: hat\nA:", "Q: fox\nA: owl\n\nQ: up\nA:"]
TARGETS = ["m", "x", "b", "d"]
CORRUPT = ["Q: cat\nA: sun\n\nQ: sun\nA:", "Q: red\nA: one\n\nQ: one\nA:", "Q: hat\nA:", "Q: fox\nA: up\n\nQ: up\nA:"]


def p_target(model, prompts, targets, hooks=()):
    """p(first target token) at each prompt's last token, one prompt at a time."""
    out = []
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        for prompt, target in zip(prompts, targets):
            tokens = model.to_tokens(prompt)
            target_id = model.to_tokens(target, prepend_bos=False)[0, 0]
            out.append(model(tokens)[0, -1].float().softmax(-1)[target_id])
    return torch.stack(out)


def zero_head(head):
    def hook(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    return hook


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cm1_equals_a_hand_written_zero_ablation_loop(arch):
    model = make_tiny(arch)
    spec = describe(model)
    result = head_scores(model, (PROMPTS, TARGETS), "cm1", batch_size=3, progress=False)
    base = p_target(model, PROMPTS, TARGETS)
    expected = torch.zeros(spec.n_layers, spec.n_heads)
    for layer in range(spec.n_layers):
        for head in range(spec.n_heads):
            ablated = p_target(model, PROMPTS, TARGETS, [(attn_hook(layer, "z"), zero_head(head))])
            expected[layer, head] = (base - ablated).mean()
    assert expected.abs().max() > 2e-5  # the heads matter: the comparison is not 0 == 0
    torch.testing.assert_close(result.scores, expected, atol=1e-8, rtol=1e-4)
    assert result.baseline == pytest.approx(float(base.mean()), abs=1e-6)
    assert result.method == "cm1" and result.n_examples == 4 and result.seconds > 0


def test_cm1_leaves_the_model_as_it_found_it():
    model = make_tiny("llama")
    params = list(model.parameters())
    params[0].requires_grad_(True)
    params[1].requires_grad_(False)
    params[0].grad = torch.full_like(params[0], 3.0)
    model.train()
    before = [p.detach().clone() for p in params]
    head_scores(model, (PROMPTS, TARGETS), "cm1", progress=False)
    assert hook_count(model) == 0
    assert params[0].requires_grad and not params[1].requires_grad
    assert torch.equal(params[0].grad, torch.full_like(params[0], 3.0))
    assert all(p.grad is None for p in params[1:])
    assert model.training
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_cm2_equals_a_hand_written_mean_activation_patch():
    model = make_tiny("llama")
    spec = describe(model)
    result = head_scores(model, (PROMPTS, TARGETS), "cm2", corrupted=(CORRUPT, TARGETS), batch_size=2, progress=False)
    # mean hook_z at the last token over the clean prompts, one prompt at a time
    mean = torch.zeros(spec.n_layers, spec.n_heads, spec.d_head)
    with torch.no_grad():
        for prompt in PROMPTS:
            _, cache = model.run_with_cache(model.to_tokens(prompt))
            for layer in range(spec.n_layers):
                mean[layer] += cache[attn_hook(layer, "z")][0, -1] / len(PROMPTS)
    base = p_target(model, CORRUPT, TARGETS)

    def patch(layer, head):
        def hook(z, hook):
            z = z.clone()
            z[:, -1, head] = mean[layer, head]
            return z

        return hook

    expected = torch.zeros(spec.n_layers, spec.n_heads)
    for layer in range(spec.n_layers):
        for head in range(spec.n_heads):
            patched = p_target(model, CORRUPT, TARGETS, [(attn_hook(layer, "z"), patch(layer, head))])
            expected[layer, head] = (patched - base).mean()
    assert expected.abs().max() > 1e-6
    torch.testing.assert_close(result.scores, expected, atol=1e-9, rtol=1e-4)


def test_atp_equals_a_hand_written_gradient_product():
    model = make_tiny("llama")
    spec = describe(model)
    result = head_scores(model, (PROMPTS, TARGETS), "atp", corrupted=(CORRUPT, TARGETS), progress=False)
    assert all(p.grad is None for p in model.parameters())  # gradients flow from the embeddings only
    expected = torch.zeros(spec.n_layers, spec.n_heads)
    for clean, bad, target in zip(PROMPTS, CORRUPT, TARGETS):
        with torch.no_grad():
            _, cache = model.run_with_cache(model.to_tokens(clean))
        saved = {}

        def keep(layer):
            def hook(z, hook):
                z.retain_grad()
                saved[layer] = z
                return z

            return hook

        def leaf(x, hook):
            return x.detach().requires_grad_(True)

        target_id = model.to_tokens(target, prepend_bos=False)[0, 0]
        hooks = [(EMBED, leaf)] + [(attn_hook(layer, "z"), keep(layer)) for layer in range(spec.n_layers)]
        with model.hooks(fwd_hooks=hooks):
            p = model(model.to_tokens(bad))[0, -1].softmax(-1)[target_id]
            p.backward()
        for layer in range(spec.n_layers):
            diff = cache[attn_hook(layer, "z")][0, -1] - saved[layer][0, -1].detach()
            expected[layer] += (diff * saved[layer].grad[0, -1]).sum(-1) / len(PROMPTS)
    assert expected.abs().max() > 1e-7
    torch.testing.assert_close(result.scores, expected, atol=1e-8, rtol=1e-4)


def test_atp_is_zero_when_the_corruption_changes_nothing():
    model = make_tiny("llama")
    result = head_scores(model, (PROMPTS, TARGETS), "atp", corrupted=(PROMPTS, TARGETS), position="all")
    assert torch.equal(result.scores, torch.zeros_like(result.scores))


def test_ra_and_fa_scores_are_mean_per_example_norms():
    model = make_tiny("llama")
    ra = reversed_attention(model, PROMPTS, TARGETS, keep="norms", batch_size=1)
    torch.testing.assert_close(head_scores(model, (PROMPTS, TARGETS), "ra").scores, ra.norms.mean(0))
    torch.testing.assert_close(head_scores(model, (PROMPTS, TARGETS), "fa").scores, ra.pattern_norms.mean(0))


def test_random_is_seeded_and_index_is_layer_order():
    model = make_tiny("llama", n_layers=3)
    spec = describe(model)
    a = head_scores(model, (PROMPTS, TARGETS), "random", seed=1)
    assert torch.equal(a.scores, head_scores(model, (PROMPTS, TARGETS), "random", seed=1).scores)
    assert not torch.equal(a.scores, head_scores(model, (PROMPTS, TARGETS), "random", seed=2).scores)
    index = head_scores(model, (PROMPTS, TARGETS), "index")
    assert index.order() == [(layer, head) for layer in range(spec.n_layers) for head in range(spec.n_heads)]
    assert index.order(reverse=True)[0] == (spec.n_layers - 1, spec.n_heads - 1)


def test_order_ranks_highest_score_first_and_reverse_is_its_mirror():
    scores = HeadScores(torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.9, -1.0]]), "custom")
    assert scores.order() == [(0, 1), (1, 1), (0, 2), (1, 0), (0, 0), (1, 2)]  # ties: layer-then-head
    assert scores.order(reverse=True) == scores.order()[::-1]
    assert scores.top(2) == [(0, 1), (1, 1)]
    frame = scores.to_dataframe()
    assert list(frame.columns) == ["layer", "head", "score", "rank", "method"]
    assert frame.set_index(["layer", "head"]).loc[(1, 2), "rank"] == 6
    figure = scores.plot()
    assert figure.axes[0].get_xlabel() == "head"


def test_shuffled_labels_permutes_outputs_in_the_prompt_format():
    icl = make_examples("antonym", shots=5, n=6, split="train")
    for clean, bad in zip(icl, shuffled_labels(icl, seed=3)):
        assert sorted(y for _, y in bad.demos) == sorted(y for _, y in clean.demos)
        assert [x for x, _ in bad.demos] == [x for x, _ in clean.demos]
        assert bad.prompt == icl_prompt(bad.demos, clean.x) and bad.target == clean.target
    relation = make_examples("verb_past_tense", shots=3, n=4, split="train")
    template = "The past tense of {} is"
    for clean, bad in zip(relation, shuffled_labels(relation)):
        assert bad.prompt == relation_prompt(template, clean.x, bad.demos)
    assert shuffled_labels(icl, seed=3) == shuffled_labels(icl, seed=3)


def test_the_default_corruption_is_the_one_make_examples_makes():
    # one label shuffle in the package: head_scores' default corrupted set is the CLI's
    for task, shots in (("antonym", 5), ("verb_past_tense", 3)):
        clean = make_examples(task, shots=shots, n=8, seed=2, split="train")
        corrupted = make_examples(task, shots=shots, n=8, seed=2, split="train", shuffle_labels=True)
        assert shuffled_labels(clean, seed=2) == corrupted.examples
        assert any(bad.demos != good.demos for bad, good in zip(corrupted, clean))


def _neg_index(model, examples, context):
    """A ranking registered by a test: later heads first (the reverse of "index")."""
    spec = context.spec
    return torch.arange(spec.n_layers * spec.n_heads, dtype=torch.float32).reshape(spec.n_layers, spec.n_heads)


def test_a_registered_method_is_usable_by_head_scores_and_the_command_line(capsys):
    from tl_reversed.cli import build_parser

    import tl_reversed.ranking as ranking

    model = make_tiny("llama")
    spec = describe(model)
    argv = ["perturbation", "--task", "capitalize", "--methods", "ra,neg_index"]
    with registered("neg_index", _neg_index):
        assert ranking.METHODS == (*METHODS, "neg_index")
        result = head_scores(model, (PROMPTS, TARGETS), "neg_index")
        assert result.method == "neg_index" and result.order()[0] == (spec.n_layers - 1, spec.n_heads - 1)
        assert result.order() == head_scores(model, (PROMPTS, TARGETS), "index").order(reverse=True)
        assert build_parser().parse_args(argv).methods == ["ra", "neg_index"]
        with pytest.raises(SystemExit):
            build_parser().parse_args(["perturbation", "--help"])
        assert "neg_index" in capsys.readouterr().out
        with pytest.raises(ValueError, match="already registered"):
            register("neg_index")(_neg_index)
    assert "neg_index" not in ranking.METHODS and ranking.METHODS == METHODS
    with pytest.raises(ValueError, match="unknown ranking method 'neg_index'; choose one of ra, fa"):
        head_scores(model, (PROMPTS, TARGETS), "neg_index")
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "unknown method(s) ['neg_index']" in capsys.readouterr().err
    with registered("flat", lambda model, examples, context: torch.zeros(3)):
        with pytest.raises(ValueError, match=r"returned \(3,\): it must return HeadScores or a \[layer, head\] tensor"):
            head_scores(model, (PROMPTS, TARGETS), "flat")
    assert ranking.METHODS == METHODS


def test_examples_sets_and_pairs_give_the_same_scores():
    model = make_tiny("llama")
    examples = ExampleSet("t", 1, [Example(p, t, "x", "y") for p, t in zip(PROMPTS, TARGETS)])
    torch.testing.assert_close(
        head_scores(model, examples, "cm1", progress=False).scores,
        head_scores(model, (PROMPTS, TARGETS), "cm1", progress=False, batch_size=1).scores,
        atol=1e-6,
        rtol=1e-4,
    )


def test_bad_inputs_say_what_to_do():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="choose one of"):
        head_scores(model, (PROMPTS, TARGETS), "gradcam")
    with pytest.raises(ValueError, match="shuffle_labels=True"):
        head_scores(model, (PROMPTS, TARGETS), "cm2", corrupted=(CORRUPT[:2], TARGETS[:2]))
    with pytest.raises(TypeError, match="make_examples"):
        head_scores(model, 42, "ra")
    with pytest.raises(ValueError, match="position='last'"):
        head_scores(model, (PROMPTS, TARGETS), "atp", corrupted=(["Q: catz\nA: sun\n\nQ: sun\nA:"] + CORRUPT[1:], TARGETS), position="all")
    assert set(METHODS) == {"ra", "fa", "cm1", "cm2", "atp", "atp0", "random", "index"}


@pytest.mark.embedded
@pytest.mark.slow
def test_cm1_on_the_embedded_model_finds_heads_that_matter(embedded_model):
    examples = make_examples("capitalize", shots=1, n=2, split="train", model=embedded_model)
    result = head_scores(embedded_model, examples, "cm1", progress=False)
    top = result.order()[0]
    # zeroing the top head really drops p(target) by its score
    ablated = p_target(embedded_model, examples.prompts, examples.targets, [(attn_hook(top[0], "z"), zero_head(top[1]))])
    assert float(result.scores[top]) == pytest.approx(result.baseline - float(ablated.mean()), abs=1e-5)
    assert float(result.scores[top]) > 0  # the top head's ablation really lowers p(target)
    assert hook_count(embedded_model) == 0
