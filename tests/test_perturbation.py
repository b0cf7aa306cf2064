"""The perturbation test: curve end points, masking, AUC, batching."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from conftest import make_tiny

from tl_reversed.core.architecture import attn_hook, describe
from tl_reversed.experiments.evaluation import accuracy, prompt_batch
from tl_reversed.perturbation import FRACTIONS, PerturbationResult, auc, head_mask, mask_hooks, perturbation_test
from tl_reversed.ranking import HeadScores, head_scores
from tl_reversed.core.state import hook_count

PROMPTS = ["Q: cat\nA: dog\n\nQ: sun\nA:", "Q: red\nA:", "Q: hat\nA: top\n\nQ: one\nA:", "Q: fox\nA:", "Q: a\nA: b\n\nQ: c\nA:", "Q: up\nA:"]


@pytest.fixture(scope="module")
def setup():
    """A tiny model and targets that are its own answers for half the prompts, so accuracy is 0.5."""
    model = make_tiny("llama", n_layers=3)
    with torch.no_grad():
        predicted = [int(model(model.to_tokens(p))[0, -1].argmax()) for p in PROMPTS]
    chars = [model.to_string(torch.tensor([i])) for i in predicted]
    other = [chr(ord("a") + (ord(c[0]) - ord("a") + 1) % 26) if c.isalpha() else "z" for c in chars]
    targets = [c if i % 2 == 0 else o for i, (c, o) in enumerate(zip(chars, other))]
    for i, t in enumerate(targets):  # the targets are one character, hence one token
        assert model.to_tokens(t, prepend_bos=False).shape[-1] == 1, (i, t)
    return model, (PROMPTS, targets)


def test_keeping_all_heads_gives_the_unpatched_accuracy_and_none_the_fully_masked(setup):
    model, examples = setup
    spec = describe(model)
    result = perturbation_test(model, examples, head_scores(model, examples, "ra"), progress=False)
    batch = prompt_batch(model, examples)
    unpatched = accuracy(model, batch)
    zero_all = [(attn_hook(layer, "z"), lambda z, hook: torch.zeros_like(z)) for layer in range(spec.n_layers)]
    masked = accuracy(model, batch, zero_all)
    assert unpatched == 0.5
    assert result.accuracy[-1] == unpatched
    assert result.accuracy[0] == masked
    assert result.n_kept[0] == 0 and result.n_kept[-1] == spec.n_layers * spec.n_heads
    assert result.fractions == list(FRACTIONS)
    assert hook_count(model) == 0


def test_each_step_keeps_the_top_heads_of_the_ranking(setup):
    model, examples = setup
    spec = describe(model)
    total = spec.n_layers * spec.n_heads
    scores = head_scores(model, examples, "random", seed=4)
    result = perturbation_test(model, examples, scores, fractions=(0.0, 0.25, 0.5, 1.0), reverse=True, progress=False)
    batch = prompt_batch(model, examples)
    order = scores.order(reverse=True)
    for fraction, kept, acc in zip(result.fractions, result.n_kept, result.accuracy):
        assert kept == round(fraction * total)
        keep = set(order[:kept])

        def hook_for(layer):
            def hook(z, hook):
                z = z.clone()
                for head in range(spec.n_heads):
                    if (layer, head) not in keep:
                        z[:, :, head] = 0
                return z

            return hook

        hooks = [(attn_hook(layer, "z"), hook_for(layer)) for layer in range(spec.n_layers)]
        assert acc == accuracy(model, batch, hooks)


def test_mask_is_one_hook_per_layer_with_a_masked_head():
    model = make_tiny("llama", n_layers=3)
    spec = describe(model)
    mask = head_mask([(0, 0), (0, 1), (0, 2), (0, 3), (2, 1)], spec)
    hooks = mask_hooks(mask)
    assert [name for name, _ in hooks] == [attn_hook(1, "z"), attn_hook(2, "z")]
    z = torch.ones(2, 5, spec.n_heads, 3)
    assert hooks[1][1](z, None)[0, 0, :, 0].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_auc_is_the_trapezoid_area():
    assert auc(FRACTIONS, [0.7] * 11) == pytest.approx(0.7)
    assert auc((0.2, 0.5, 0.6), [0.4, 0.4, 0.4]) == pytest.approx(0.4)
    assert auc(FRACTIONS, FRACTIONS) == pytest.approx(0.5)
    assert auc((0.0, 0.5, 1.0), (0.0, 1.0, 1.0)) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least two"):
        auc([0.0], [1.0])


def test_batching_and_the_shared_cache_give_the_same_curve(setup):
    model, examples = setup
    scores = head_scores(model, examples, "index")
    one = perturbation_test(model, examples, scores, batch_size=1, progress=False)
    cache: dict = {}
    allin = perturbation_test(model, examples, scores, batch_size=None, progress=False, cache=cache)
    again = perturbation_test(model, examples, scores.scores, batch_size=None, progress=False, cache=cache)
    assert one.accuracy == allin.accuracy == again.accuracy
    assert len(cache) == len(FRACTIONS)
    assert one.auc == pytest.approx(auc(one.fractions, one.accuracy))


def test_result_table_and_plot(setup):
    model, examples = setup
    result = perturbation_test(model, examples, head_scores(model, examples, "index"), reverse=True, progress=False)
    frame = result.to_dataframe()
    assert list(frame.columns) == ["method", "reverse", "fraction", "n_kept", "accuracy"]
    assert frame["accuracy"].tolist() == result.accuracy and bool(frame["reverse"].all())
    figure = result.plot()
    assert "index (reversed)" in figure.axes[0].get_legend().get_texts()[0].get_text()


def test_bad_inputs_say_what_to_do(setup):
    model, examples = setup
    scores = head_scores(model, examples, "index")
    with pytest.raises(ValueError, match="strictly increasing"):
        perturbation_test(model, examples, scores, fractions=(0.5, 0.2))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        perturbation_test(model, examples, scores, fractions=(0.0, 1.5))
    with pytest.raises(ValueError, match="shape"):
        perturbation_test(model, examples, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="exactly once"):
        perturbation_test(model, examples, [(0, 0), (0, 0)])
    assert isinstance(scores, HeadScores)


def test_cli_table_has_each_method_and_its_reverse_with_the_best_in_bold():
    import argparse

    import pandas as pd

    from tl_reversed.cli import build_parser
    from tl_reversed.commands.common import int_list
    from tl_reversed.commands.perturbation import auc_markdown, method_list

    aucs = pd.DataFrame(
        {
            "shots": [0, 0, 5, 5],
            "method": ["ra", "cm1", "ra", "cm1"],
            "auc": [0.2, 0.3, 0.8, 0.7],
            "auc_reverse": [0.1, 0.05, 0.2, 0.4],
            "accuracy_all_heads": [0.1, 0.1, 0.9, 0.9],
        }
    )
    lines = auc_markdown(aucs, [0, 5], ["ra", "cm1"]).splitlines()
    assert lines[0] == "| method | 0-shot ↑ | 0-shot ↓ | 5-shot ↑ | 5-shot ↓ |"
    assert lines[2] == "| RA | 0.200 | 0.100 | **0.800** | **0.200** |"
    assert lines[3] == "| CM1 | **0.300** | **0.050** | 0.700 | 0.400 |"
    assert lines[4] == "| all heads (no mask) | 0.10 |  | 0.90 |  |"
    assert int_list("0,1,5") == [0, 1, 5] and method_list("RA,cm2") == ["ra", "cm2"]
    with pytest.raises(argparse.ArgumentTypeError, match="choose from"):
        method_list("ra,gradcam")
    with pytest.raises(argparse.ArgumentTypeError, match="integers"):
        int_list("one")
    args = build_parser().parse_args(["perturbation", "--task", "capitalize", "--shots", "1,5"])
    assert args.shots == [1, 5] and args.methods == ["ra", "fa", "cm1", "cm2", "atp", "random", "index"]
    assert args.n == 50 and args.n_score == 25 and args.draw == "current"
    assert build_parser().parse_args(["perturbation", "--task", "capitalize", "--draw", "0.1.0"]).draw == "0.1.0"
    assert build_parser().parse_args(["patching", "--task", "capitalize", "--draw", "0.1.0"]).draw == "0.1.0"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["perturbation", "--task", "capitalize", "--draw", "0.2"])


def test_checkpoint_resumes_only_units_made_with_the_same_settings(tmp_path):
    from tl_reversed.commands.common import Checkpoint
    from tl_reversed.experiments.ranking import HeadScores

    scores = HeadScores(torch.tensor([[0.5, -0.0], [2.0, 1.0]]), "ra", seconds=1.25, n_examples=3, info={"loss": 2.5})
    curve = PerturbationResult([0.0, 0.5, 1.0], [0, 2, 4], [0.1, 0.4, 0.9], "ra", True, 30, seconds=0.5)
    first = Checkpoint(tmp_path, "capitalize_perturbation", {"n": 30, "seed": 0})
    first.save("5-shot_ra", {"scores": scores, "reversed": curve}, {"seconds": 3.5})
    assert sorted(p.name for p in (tmp_path / ".partial" / "capitalize_perturbation").iterdir()) == [
        "5-shot_ra.json", "5-shot_ra.reversed.safetensors", "5-shot_ra.scores.safetensors"
    ]
    results, info = Checkpoint(tmp_path, "capitalize_perturbation", {"n": 30, "seed": 0}).load("5-shot_ra")
    assert info == {"seconds": 3.5} and results["reversed"] == curve
    assert torch.equal(results["scores"].scores, scores.scores) and results["scores"].info == {"loss": 2.5}
    assert Checkpoint(tmp_path, "capitalize_perturbation", {"n": 30, "seed": 1}).load("5-shot_ra") is None
    assert Checkpoint(tmp_path, "capitalize_perturbation", {"n": 30, "seed": 0}, enabled=False).load("5-shot_ra") is None
    assert first.load("1-shot_ra") is None
    (tmp_path / ".partial" / "capitalize_perturbation" / "5-shot_ra.scores.safetensors").write_bytes(b"junk")
    assert first.load("5-shot_ra") is None  # an unreadable unit is recomputed
    first.clear()
    assert not (tmp_path / ".partial").exists()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3", "neox"])
def test_last_logits_unembeds_only_the_last_token_and_matches_the_full_logits(arch):
    from tl_reversed.core.engine import last_position_hook
    from tl_reversed.experiments.evaluation import last_logits

    model = make_tiny(arch)
    batch = prompt_batch(model, (PROMPTS, [" x"] * len(PROMPTS)))
    with torch.no_grad():
        full = model(batch.tokens)
        only_last = last_position_hook(model, batch.last)
        assert only_last is not None
        assert model.run_with_hooks(batch.tokens, fwd_hooks=[only_last]).shape == (len(PROMPTS), 1, model.cfg.d_vocab)
    expected = full[torch.arange(len(PROMPTS)), batch.last]
    for batch_size in (None, 4, 1):  # one hook, re-pointed at each mini-batch's last tokens
        torch.testing.assert_close(last_logits(model, batch, batch_size=batch_size), expected, atol=1e-5, rtol=1e-5)
    # a caller's hook on the logits sees every position
    widths = []
    seen = [("unembed.hook_out", lambda logits, hook: widths.append(logits.shape[1]))]
    torch.testing.assert_close(last_logits(model, batch, seen, batch_size=None), expected, atol=1e-5, rtol=1e-5)
    assert widths == [batch.tokens.shape[1]]
    assert hook_count(model) == 0
