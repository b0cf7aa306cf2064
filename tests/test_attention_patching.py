"""Attention patching: the patch at hook_z, averaged maps, sweeps, iterative patching."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from conftest import LEGACY, make_tiny

from tl_reversed import reversed_attention
from tl_reversed.core.architecture import attn_hook, describe
from tl_reversed.attention_patching import (
    PAPER_LRS,
    AttentionMaps,
    attention_patch,
    attention_patch_hooks,
    average_maps,
    evaluate_patching,
    iterative_patching,
)
from tl_reversed.experiments.evaluation import accuracy, prompt_batch
from tl_reversed.core.state import hook_count

# Seven prompts of 12 characters (13 tokens with BOS) and one-character targets.
TRAIN = (["Q: cat\nA: do", "Q: sun\nA: mo", "Q: red\nA: bl", "Q: hat\nA: ca"], ["g", "o", "u", "p"])
TEST_PROMPTS = ["Q: fox\nA: ow", "Q: one\nA: tw", "Q: pen\nA: in"]


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def test_set(model):
    """Test targets: the model's own answers for two prompts, another character for one."""
    with torch.no_grad():
        answers = [model.to_string(model(model.to_tokens(p))[0, -1].argmax()) for p in TEST_PROMPTS]
    targets = [answers[0], answers[1], "q" if answers[2] != "q" else "r"]
    for t in targets:
        assert model.to_tokens(t, prepend_bos=False).shape[-1] == 1
    return TEST_PROMPTS, targets


@pytest.fixture(scope="module")
def maps(model):
    return average_maps(model, TRAIN, "ra")


def test_patch_at_z_equals_editing_hook_pattern(model, maps):
    tokens = model.to_tokens(TEST_PROMPTS)
    with torch.no_grad():
        plain = model(tokens)
        with attention_patch(model, maps, lr=-400.0):
            at_z = model(tokens)
        with attention_patch(model, maps, lr=-400.0, at="pattern"):
            at_pattern = model(tokens)
        by_hand = [
            (attn_hook(layer, "pattern"), lambda p, hook, layer=layer: p - 400.0 * maps.maps[layer])
            for layer in range(describe(model).n_layers)
        ]
        with model.hooks(fwd_hooks=by_hand):
            edited = model(tokens)
    assert (at_z - plain).abs().max() > 1e-3  # the patch does something
    torch.testing.assert_close(at_z, edited, atol=1e-5, rtol=0)
    torch.testing.assert_close(at_pattern, edited, atol=1e-5, rtol=0)
    assert hook_count(model) == 0


def test_lr_zero_changes_nothing(model, maps):
    tokens = model.to_tokens(TEST_PROMPTS)
    with torch.no_grad():
        plain = model(tokens)
        with attention_patch(model, maps, lr=0.0):
            patched = model(tokens)
    assert torch.equal(plain, patched)


@pytest.mark.skipif(LEGACY, reason="the bridge delegates OPT attention; HookedTransformer always computes it")
def test_pattern_patch_refuses_where_the_bridge_discards_pattern_edits():
    opt = make_tiny("opt")
    assert not describe(opt).pattern_editable
    group = (["Q: cat\nA: do"], ["g"])
    opt_maps = average_maps(opt, group)
    with pytest.raises(ValueError, match="at='z'"):
        attention_patch_hooks(opt, opt_maps, -30.0, at="pattern")
    # at hook_z the patch works there too, and equals the pattern edit computed by hand
    tokens = opt.to_tokens("Q: fox\nA: ow")
    with torch.no_grad():
        plain = opt(tokens)
        with attention_patch(opt, opt_maps, -1000.0):
            patched = opt(tokens)
    assert (patched - plain).abs().max() > 1e-4


def test_average_maps_is_the_mean_of_per_example_ra(model, maps):
    per_example = reversed_attention(model, *TRAIN, batch_size=1)
    torch.testing.assert_close(maps.maps, per_example.maps.mean(0), atol=1e-9, rtol=1e-5)
    assert maps.length == 13 and maps.n_examples == 4 and maps.source == "ra"
    assert maps.loss == pytest.approx(float(per_example.loss.mean()), rel=1e-5)
    # not shrunk by the batch: one batch of four gives the same maps as four batches of one
    torch.testing.assert_close(average_maps(model, TRAIN, batch_size=1).maps, maps.maps, atol=1e-9, rtol=1e-5)
    forward = average_maps(model, TRAIN, "fa")
    torch.testing.assert_close(forward.maps, per_example.pattern.mean(0), atol=1e-7, rtol=1e-5)
    assert forward.maps.sum(-1).sub(1).abs().max() < 1e-5  # attention rows sum to one
    assert maps.maps.sum(-1).abs().max() < 1e-7  # RA rows sum to zero


def test_sweep_reports_accuracy_per_lr(model, maps, test_set):
    sweep = evaluate_patching(model, TRAIN, test_set, "ra", lrs=[1.0, 0.0, -400.0], maps=maps, progress=False)
    batch = prompt_batch(model, test_set)
    with attention_patch(model, maps, -400.0):
        patched = accuracy(model, batch)
    assert sweep.original == pytest.approx(2 / 3)
    assert sweep.at(0.0) == sweep.original
    assert sweep.at(-400.0) == patched
    assert sweep.lrs == [1.0, 0.0, -400.0] and sweep.n_test == 3 and sweep.length == 13
    assert sweep.to_dataframe()["accuracy"].tolist() == sweep.accuracy
    assert sweep.plot().axes[0].get_xscale() == "symlog"
    assert PAPER_LRS[0] == 3 and PAPER_LRS[-1] == -120 and len(PAPER_LRS) == 23


def test_iterative_patching_with_one_step_equals_one_shot_patching(model, maps, test_set):
    lr = -400.0
    one = iterative_patching(model, TRAIN, test_set, lr=lr, steps=1, progress=False)
    sweep = evaluate_patching(model, TRAIN, test_set, "ra", lrs=[lr], progress=False)
    assert torch.equal(one.patch, lr * maps.maps)
    assert one.accuracy == [sweep.original, sweep.accuracy[0]]
    assert one.train_loss[0] == pytest.approx(maps.loss)


def test_iterative_step_two_recomputes_ra_under_the_patch(model, maps, test_set):
    lr = -400.0
    two = iterative_patching(model, TRAIN, test_set, lr=lr, steps=2, progress=False)
    under_patch = average_maps(model, TRAIN, extra_hooks=attention_patch_hooks(model, maps, lr))
    torch.testing.assert_close(two.patch, lr * maps.maps + lr * under_patch.maps, atol=1e-7, rtol=1e-5)
    assert not torch.allclose(under_patch.maps, maps.maps)  # the patch changed the gradient
    assert two.train_loss[1] == pytest.approx(under_patch.loss, rel=1e-5)
    assert len(two.accuracy) == 3 and len(two.train_loss) == 3
    assert two.to_dataframe()["step"].tolist() == [0, 1, 2]
    assert hook_count(model) == 0


def test_prompts_of_another_length_get_a_clear_error(model, maps):
    with pytest.raises(ValueError, match=r"13 tokens.*14 tokens.*same_length_groups"):
        evaluate_patching(model, TRAIN, (["Q: fox\nA: ow", "Q: fox\nA: owl"], ["l", "s"]), maps=maps)
    with pytest.raises(ValueError, match=r"3 prompts of 13, 1 prompts of 14.*same_length_groups"):
        average_maps(model, (TRAIN[0][:3] + ["Q: cats\nA: do"], TRAIN[1]))
    with pytest.raises(ValueError, match="same_length_groups"):
        iterative_patching(model, TRAIN, (["Q: a\nA:"], ["b"]), steps=1)
    with pytest.raises(ValueError, match=r"averaged over prompts of 13 tokens.*reading 7 tokens"):
        with attention_patch(model, maps, -1.0), torch.no_grad():
            model(model.to_tokens("Q: a\nA"))
    with pytest.raises(ValueError, match="source must be one of"):
        average_maps(model, TRAIN, "cm")
    with pytest.raises(TypeError, match="AttentionMaps"):
        attention_patch_hooks(model, torch.zeros(3, 3), 1.0)
    assert hook_count(model) == 0
    assert isinstance(maps, AttentionMaps)


@pytest.mark.embedded
def test_ra_patching_helps_zero_shot_capitalize_on_the_embedded_model(embedded_model):
    from tl_reversed.tasks import make_examples, same_length_groups

    train = same_length_groups(embedded_model, make_examples("capitalize", split="train", model=embedded_model))[0]
    test = [e for e in make_examples("capitalize", split="test", model=embedded_model) if len(embedded_model.to_tokens(e.prompt)[0]) == train.length]
    sweep = evaluate_patching(embedded_model, train[:25], test[:40], "ra", lrs=[-10.0], progress=False)
    assert sweep.original <= 0.1
    assert sweep.accuracy[0] >= sweep.original + 0.15


def test_cli_picks_the_length_with_enough_training_and_most_test_prompts(model):
    from tl_reversed.cli import build_parser
    from tl_reversed.commands.patching import float_list, pick_length
    from tl_reversed.tasks import Example, ExampleSet

    def examples(prompts):
        return ExampleSet("t", 0, [Example(p, "x", "a", "b") for p in prompts])

    train = examples(["aaaa"] * 3 + ["bbbbb"] * 5 + ["cccccc"] * 5)
    test = examples(["dddd"] * 9 + ["eeeee"] * 2 + ["ffffff"] * 4)
    length, train_group, test_group = pick_length(model, train, test, n_train=4, n_test=10)
    assert length == 7 and len(train_group) == 4 and len(test_group) == 4  # 6 characters + BOS
    length, _, test_group = pick_length(model, train, test, n_train=3, n_test=10)
    assert length == 5 and len(test_group) == 9
    assert float_list("1,-30") == [1.0, -30.0] and float_list("paper") == [float(lr) for lr in PAPER_LRS]
    args = build_parser().parse_args(["patching", "--task", "capitalize", "--iterative"])
    assert args.shots == [0, 1, 5] and args.iterative and args.iter_lr == -10.0 and args.steps == 5
