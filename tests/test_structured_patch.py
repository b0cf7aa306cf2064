"""Structured (length-independent) attention patches, sparse patches and the iterative stopping rule."""

from __future__ import annotations

import pytest
import torch

from tl_reversed.core.state import hook_count
from tl_reversed.experiments.attention_patching import average_maps, iterative_patching
from tl_reversed.experiments.patch_hooks import attention_patch, attention_patch_hooks, head_mask
from tl_reversed.experiments.structured_patch import (
    StructuredPatch,
    sparse_patching,
    structured_accuracy,
    structured_maps,
    token_segments,
)
from tl_reversed.experiments.tasks import icl_prompt, prompt_segments, relation_prompt
from tl_reversed.testing import tiny_model

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl"]
LONG = ["abc", "defg", "h", "ijklm", "no"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=2, n_heads=4)


def examples(xs, shots=0):
    demos = [("zz", "y")] * shots
    return [icl_prompt(demos, x) for x in xs], [" " + x[0] for x in xs]


def last_logits(model, prompts, hooks):
    tokens = model.to_tokens(prompts)  # right-padded
    lengths = [len(model.to_str_tokens(p)) for p in prompts]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return torch.stack([logits[i, n - 1] for i, n in enumerate(lengths)])


def test_prompt_segments_cover_the_prompt_and_match_the_token_strings(model):
    prompt = icl_prompt([("ab", "c")], "de")
    chars = prompt_segments(prompt)
    assert [prompt[a:b] for _, a, b in chars] == ["Q:", " ab", "\nA:", " c", "\n\n", "Q:", " de", "\nA:"]
    strings = model.to_str_tokens(prompt)
    spans = token_segments(model, prompt)
    assert {name: "".join(strings[a:b]) for name, a, b in spans} == {
        "bos": strings[0], "demo0.Q": "Q:", "demo0.x": " ab", "demo0.A": "\nA:", "demo0.y": " c",
        "demo0.sep": "\n\n", "query.Q": "Q:", "query.x": " de", "query.A": "\nA:",
    }  # fmt: skip
    rel = relation_prompt("The capital of {} is", "Peru", [("Chad", "N")])
    assert [(n, rel[a:b]) for n, a, b in prompt_segments(rel, "The capital of {} is")] == [
        ("demo0.pre", "The capital of"), ("demo0.x", " Chad"), ("demo0.post", " is"), ("demo0.y", " N"),
        ("demo0.sep", "\n"), ("query.pre", "The capital of"), ("query.x", " Peru"), ("query.post", " is"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not in the ICL format"):
        prompt_segments("hello world")


@pytest.mark.parametrize("source", ["ra", "fa"])
def test_structured_patch_of_one_length_equals_the_same_length_patch(model, source):
    train = examples(WORDS[:5])
    same = average_maps(model, train, source, batch_size=2)
    patch = structured_maps(model, train, source, batch_size=3)
    dense = patch.dense(model, train[0][0])
    torch.testing.assert_close(dense, same.maps.float().tril(), atol=1e-6, rtol=1e-6)
    assert patch.n_examples == 5 and patch.lengths == [same.length] * 5
    assert float(same.maps.float().abs().max()) > 0  # a real comparison, not of zeros


def test_padded_mixed_length_batch_equals_one_prompt_at_a_time(model):
    patch = structured_maps(model, examples(LONG + WORDS[:2], shots=1), lr=-30.0)
    prompts, _ = examples(["q", "rstuv", "wx", "yzab"], shots=1)
    assert len({len(model.to_str_tokens(p)) for p in prompts}) == 4
    together = last_logits(model, prompts, patch.hooks(model, prompts))
    alone = torch.cat([last_logits(model, [p], patch.hooks(model, [p])) for p in prompts])
    plain = torch.cat([last_logits(model, [p], []) for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert float((alone - plain).abs().max()) > 1e-3  # the patch changes the answers
    # the engine path (chunks sorted by length) agrees with the hooks
    acc = structured_accuracy(model, patch, (prompts, [" a"] * 4), batch_size=3)
    first = model.to_tokens(" a", prepend_bos=False)[0, 0]
    assert acc.tolist() == (alone.argmax(-1) == first).float().tolist()


def test_save_load_gives_identical_patched_logits(model, tmp_path):
    patch = structured_maps(model, examples(LONG))
    prompts, _ = examples(["ab", "cdefg"])
    path = patch.save(tmp_path / "patch.safetensors")
    loaded = StructuredPatch.load(path)
    assert loaded.cells == patch.cells and loaded.template is None and loaded.lr == -30.0
    assert torch.equal(last_logits(model, prompts, loaded.hooks(model, prompts)), last_logits(model, prompts, patch.hooks(model, prompts)))


def test_a_patch_for_another_model_is_refused(model):
    other = tiny_model(n_layers=3, n_heads=4)
    patch = structured_maps(other, examples(WORDS[:2]))
    with pytest.raises(ValueError, match="made for a model with 3 layers and 4 heads, but the model has 2 layers and 4 heads"):
        patch.hooks(model, ["Q: ab\nA:"])
    with pytest.raises(ValueError, match="made for a model with 3 layers"):
        structured_accuracy(model, patch, examples(WORDS[:2]))


def state(model):
    return hook_count(model), model.training, [p.requires_grad for p in model.parameters()], [p.grad for p in model.parameters()]


def test_the_model_is_left_as_found(model):
    before = state(model)
    patch = structured_maps(model, examples(LONG))
    structured_accuracy(model, patch, examples(WORDS))
    prompts = ["Q: ab\nA:", "Q: abcd\nA:"]
    with pytest.raises(ValueError, match="laid out for 2 prompts"):
        with attention_patch(model, patch, prompts=prompts):
            model(model.to_tokens(prompts[:1]))
    assert state(model) == before
    with pytest.raises(TypeError, match="pass prompts="):
        with attention_patch(model, patch):
            pass


def test_sparse_patches_keep_only_the_top_heads(model):
    norms = torch.tensor([[1.0, 5.0, 2.0, 0.5], [4.0, 3.0, 0.1, 0.2]])
    assert head_mask(norms, top_k=0.25).nonzero().tolist() == [[0, 1], [1, 0]]
    assert head_mask(norms, top_k=3).sum() == 3 and head_mask(norms, top_k=0.01).sum() == 1
    assert head_mask(norms) is None and head_mask(norms, heads=[(1, 3)]).nonzero().tolist() == [[1, 3]]
    with pytest.raises(ValueError, match="top_k must be a fraction"):
        head_mask(norms, top_k=1.5)
    patch = structured_maps(model, examples(LONG))
    prompts, _ = examples(["ab", "cdefg"])
    full = last_logits(model, prompts, patch.hooks(model, prompts))
    assert torch.equal(last_logits(model, prompts, patch.hooks(model, prompts, top_k=1.0)), full)
    one = head_mask(patch.norms(), top_k=1).nonzero()[0].tolist()
    assert torch.equal(last_logits(model, prompts, patch.hooks(model, prompts, top_k=1)),
                       last_logits(model, prompts, patch.hooks(model, prompts, heads=[tuple(one)])))  # fmt: skip
    result = sparse_patching(model, patch, examples(WORDS), fractions=(0.125, 1.0))
    assert result.n_heads == [1, 8]
    assert result.accuracy[1] == float(structured_accuracy(model, patch, examples(WORDS)).mean())
    line, unpatched = result.plot().axes[0].lines  # the figure draws the result's own numbers
    assert list(line.get_xdata()) == [1, 8] and list(line.get_ydata()) == result.accuracy
    assert list(unpatched.get_ydata()) == [result.original] * 2
    # the same-length hooks take the same arguments
    same = average_maps(model, examples(WORDS[:3]))
    assert len(attention_patch_hooks(model, same, -30.0, top_k=0.5)) == len(attention_patch_hooks(model, same, -30.0))


def test_stopping_rule_reads_only_the_training_prompts(model):
    train = examples(WORDS[:4])
    prompts = examples(WORDS[4:])[0]
    test = (prompts, [model.to_string(i) for i in last_logits(model, prompts, []).argmax(-1)])  # right before patching
    garbage = (prompts, ["z", "q"])
    a = iterative_patching(model, train, test, lr=-300.0, steps="auto", max_steps=6, tol=0.01, progress=False)
    b = iterative_patching(model, train, garbage, lr=-300.0, steps="auto", max_steps=6, tol=0.01, progress=False)
    assert a.accuracy[0] == 1.0 and a.accuracy != b.accuracy  # the test sets differ ...
    assert a.chosen_step == b.chosen_step and a.train_loss == b.train_loss  # ... the choice does not
    assert 0 < a.chosen_step < 6 and len(a.train_loss) == a.chosen_step + 1  # stopped on the plateau
    improvement = 1 - a.train_loss[-1] / a.train_loss[-2]
    assert improvement < 0.01 <= 1 - a.train_loss[-2] / a.train_loss[-3]
    assert torch.equal(a.patch, b.patch)
    fixed = iterative_patching(model, train, test, lr=-10.0, steps=2, progress=False)
    assert fixed.chosen_step == 2 and len(fixed.accuracy) == 3


@pytest.mark.embedded
def test_segments_match_the_embedded_tokenizer(embedded_model):
    from tl_reversed.experiments.tasks import make_examples

    for example in make_examples("capitalize", shots=2, n=5, model=embedded_model):
        strings = embedded_model.to_str_tokens(example.prompt)
        spans = token_segments(embedded_model, example.prompt)
        assert spans[0] == ("bos", 0, 1) and spans[-1][2] == len(strings)
        text = {name: "".join(strings[a:b]) for name, a, b in spans}
        assert text["query.x"] == f" {example.x}" and text["query.A"] == "\nA:"
        assert [text[f"demo{i}.y"] for i in range(2)] == [f" {y}" for _, y in example.demos]
        assert [text[f"demo{i}.sep"] for i in range(2)] == ["\n\n", "\n\n"]


@pytest.mark.embedded
def test_segments_of_a_character_split_over_tokens(embedded_model):
    """SmolLM2's byte-level tokenizer splits "œ" over two tokens, neither of which spells it:
    each segment's tokens still decode to exactly that segment's text, and both halves of
    "œ" stay in the answer's segment (english-french's prompts broke this)."""
    tokenizer = embedded_model.tokenizer
    for prompt in ("Q: implement\nA: mettre en œuvre\n\nQ: main\nA:", "Q: heart\nA: cœur\n\nQ: œil\nA:"):
        ids = [int(t) for t in embedded_model.to_tokens(prompt)[0]]
        assert "".join(embedded_model.to_str_tokens(prompt)[1:]) != prompt  # the fallback is taken
        spans = token_segments(embedded_model, prompt)
        assert spans[0] == ("bos", 0, 1) and spans[-1][2] == len(ids)
        assert [a for _, a, _ in spans[1:]] == [b for _, _, b in spans[:-1]]  # contiguous
        chars = {}
        for name, a, b in prompt_segments(prompt):
            chars[name] = chars.get(name, "") + prompt[a:b]
        for name, a, b in spans[1:]:
            assert tokenizer.decode(ids[a:b], clean_up_tokenization_spaces=False) == chars[name], name


def test_apply_patch_top_tokens_and_missing_file(model, tmp_path, capsys):
    from tl_reversed.commands.apply_patch import top_tokens
    from tl_reversed.commands.cli import main

    patch = StructuredPatch.load(structured_maps(model, examples(LONG)).save(tmp_path / "p.safetensors"))
    prompts = ["Q: ab\nA:", "Q: abcdef\nA:"]
    table = top_tokens(model, prompts, patch, None, None, 3)
    assert len(table) == 2 * 2 * 3
    for patched, hooks in ((False, []), (True, patch.hooks(model, prompts))):
        logits = last_logits(model, prompts, hooks)
        for i, prompt in enumerate(prompts):
            rows = table[(table.prompt == prompt) & (table.patched == patched)]
            top = logits[i].softmax(-1).topk(3)
            assert rows.token.tolist() == [model.to_string(t) for t in top.indices]
            assert rows.prob.tolist() == pytest.approx(top.values.tolist(), abs=1e-6)
    assert main(["apply-patch", "--patch", str(tmp_path / "missing.safetensors"), "--prompt", "Q: a\nA:"]) == 2
    assert "no such file; write one with tl-reversed patching ... --save PATCH" in capsys.readouterr().err


def test_patching_cli_takes_steps_auto_and_save():
    from tl_reversed.commands.cli import build_parser

    args = build_parser().parse_args(["patching", "--task", "capitalize", "--iterative", "--steps", "auto", "--max-steps", "8",
                                      "--tol", "0.01", "--save", "p.safetensors"])  # fmt: skip
    assert (args.steps, args.max_steps, args.tol, args.save) == ("auto", 8, 0.01, "p.safetensors")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["patching", "--task", "capitalize", "--steps", "often"])


def test_patching_table_and_plot_with_steps_auto():
    import argparse

    import pandas as pd

    from tl_reversed.commands.patching import patching_markdown, plot_sweeps

    table = pd.DataFrame([{"shots": 1, "length": 16, "n_train": 12, "n_test": 30, "original": 0.1, "fa": 0.1, "ra": 0.5,
                           "fa_best_lr": 1.0, "fa_best": 0.2, "ra_best_lr": -10.0, "ra_best": 0.9, "iterative_lr": -10.0,
                           "iterative_steps": "auto", "iterative_chosen_step": 6, "iterative": 1.0, "iterative_best": 1.0,
                           "n_test_all": 30, "all_original": 0.1, "structured": 0.97, "structured_top0.01": 0.1,
                           "structured_top0.05": 0.2, "structured_top0.1": 0.5, "structured_top0.25": 0.9}])  # fmt: skip
    args = argparse.Namespace(lr_fa=1.0, lr_ra=-30.0, iter_lr=-10.0, steps="auto")
    markdown = patching_markdown(table, args)
    assert "iterative RA (lr -10, auto steps; chosen step; best step)" in markdown and "| 1.00 (step 6; 1.00) |" in markdown
    assert "| 0.97 (0.10; 30) | 0.10 / 0.20 / 0.50 / 0.90 |" in markdown
    sweeps = pd.DataFrame([{"shots": 1, "source": s, "lr": lr, "accuracy": 0.5} for s in ("ra", "fa") for lr in (-10.0, 1.0)])
    fig = plot_sweeps(table, sweeps, pd.DataFrame(), "capitalize")
    assert "iterative RA (step 6, lr -10) (1.00)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


@pytest.mark.embedded
def test_patching_save_reports_the_structured_and_sparse_accuracies(embedded_model, tmp_path):
    import argparse

    from tl_reversed.commands.patching import SPARSE_FRACTIONS, _save_structured
    from tl_reversed.experiments.structured_patch import structured_accuracy
    from tl_reversed.experiments.tasks import make_examples

    args = argparse.Namespace(n_train=4, n_test=6, lr_ra=-30.0, batch_size=4, template=0, shots=[1],
                              save=str(tmp_path / "p.safetensors"), iterative=True, iter_lr=-10.0, steps=2,
                              max_steps=10, tol=1e-3)  # fmt: skip
    common = dict(shots=1, seed=0, model=embedded_model, template=0)
    row, steps = _save_structured(embedded_model, "capitalize", 1, common, args)
    patch = StructuredPatch.load(tmp_path / "p.safetensors")
    test = make_examples("capitalize", split="test", n=6, **common)
    assert row["n_test_all"] == len(test) == 6
    assert row["all_original"] == pytest.approx(float(structured_accuracy(embedded_model, None, test).mean()))
    assert row["structured"] == pytest.approx(float(structured_accuracy(embedded_model, patch, test).mean()))
    for k in SPARSE_FRACTIONS[:-1]:
        expected = float(structured_accuracy(embedded_model, patch, test, top_k=k).mean())
        assert row[f"structured_top{k:g}"] == pytest.approx(expected)
    assert patch.n_examples == 4 and patch.lr == -30.0
    from tl_reversed.experiments.iterative_structured import iterative_structured

    train = make_examples("capitalize", split="train", n=4, **common)
    it = iterative_structured(embedded_model, train, test, lr=-10.0, steps=2, batch_size=4, progress=False)
    assert row["structured_iterative_step"] == it.chosen_step == 2
    assert (row["structured_iterative"], row["structured_iterative_best"]) == (it.accuracy[2], max(it.accuracy))
    assert [r["accuracy"] for r in steps] == it.accuracy and [r["step"] for r in steps] == [0, 1, 2]
    assert [r["chosen"] for r in steps] == [False, False, True] and [r["train_loss"] for r in steps] == it.train_loss[:3]


def test_iterative_structured_on_one_length_is_iterative_patching(model, tmp_path):
    from tl_reversed.experiments.iterative_structured import IterativeStructured, iterative_structured

    train = examples(WORDS[:4])
    prompts = examples(WORDS[4:])[0]
    test = (prompts, [model.to_string(i) for i in last_logits(model, prompts, []).argmax(-1)])
    same = iterative_patching(model, train, test, lr=-300.0, steps=3, progress=False)
    structured = iterative_structured(model, train, test, lr=-300.0, steps=3, progress=False)
    assert structured.accuracy == same.accuracy and structured.accuracy[0] == 1.0 and min(same.accuracy) < 1.0
    assert structured.train_loss == pytest.approx(same.train_loss, rel=1e-5)
    assert structured.chosen_step == 3 and structured.patch.lr == 1.0
    torch.testing.assert_close(structured.patch.dense(model, prompts[0]), same.patch.tril(), atol=1e-5, rtol=1e-5)
    # the patched logits agree on a prompt of the training length, and the patch applies to other lengths too
    torch.testing.assert_close(last_logits(model, prompts, structured.patch.hooks(model, prompts)),
                               last_logits(model, prompts, attention_patch_hooks(model, same.patch, 1.0)), atol=1e-4, rtol=1e-4)  # fmt: skip
    other = examples(LONG)[0]
    assert not torch.equal(last_logits(model, other, structured.patch.hooks(model, other)), last_logits(model, other, []))
    # auto: the choice reads the training prompts only; the result round-trips
    garbage = (prompts, ["z", "q"])
    a = iterative_structured(model, examples(LONG), test, lr=-300.0, max_steps=6, tol=0.01, progress=False)
    b = iterative_structured(model, examples(LONG), garbage, lr=-300.0, max_steps=6, tol=0.01, progress=False)
    assert a.accuracy != b.accuracy and a.chosen_step == b.chosen_step and a.train_loss == b.train_loss
    assert 0 < a.chosen_step < 6 and a.train_loss[a.chosen_step] == min(a.train_loss)
    assert list(a.to_dataframe().columns) == ["step", "lr", "accuracy", "train_loss"]
    loaded = IterativeStructured.load(a.save(tmp_path / "it.safetensors"))
    assert loaded.accuracy == a.accuracy and loaded.chosen_step == a.chosen_step
    assert torch.equal(loaded.patch.maps, a.patch.maps) and loaded.patch.cells == a.patch.cells
    with pytest.raises(ValueError, match="steps"):
        iterative_structured(model, train, test, steps=0)


@pytest.mark.embedded
def test_a_killed_patching_run_resumes_with_its_structured_units(embedded_model, tmp_path, monkeypatch):
    """``tl-reversed patching --save`` keeps each shot count's structured part as a checkpoint unit:
    a rerun after a kill learns only the patches whose unit or file is missing, and writes the
    kept numbers."""
    import json

    import pandas as pd

    from tl_reversed.commands import patching
    from tl_reversed.commands.cli import main

    monkeypatch.setattr(patching, "load_cli_model", lambda args: embedded_model)
    out, save = tmp_path / "out", tmp_path / "p.safetensors"
    argv = ["patching", "--task", "capitalize", "--shots", "0,1", "--n-train", "3", "--n-test", "3", "--lrs=-30",
            "--iterative", "--steps", "1", "--save", str(save), "--out", str(out)]  # fmt: skip

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    plot_sweeps = patching.plot_sweeps
    monkeypatch.setattr(patching, "plot_sweeps", killed)  # killed after every unit is done
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    units = out / ".partial" / "capitalize_patching"
    kept = {k: json.loads((units / f"{k}-shot_structured.json").read_text())["info"] for k in (0, 1)}
    (tmp_path / "p_0shot.safetensors").unlink()  # the 0-shot patch is gone: that unit is redone

    monkeypatch.setattr(patching, "plot_sweeps", plot_sweeps)
    learn, learned = patching._save_structured, []
    monkeypatch.setattr(patching, "_save_structured", lambda model, task, shots, *rest: learned.append(shots) or learn(model, task, shots, *rest))
    assert main(argv) == 0
    assert learned == [0] and (tmp_path / "p_0shot.safetensors").exists() and not units.exists()
    table = pd.read_csv(out / "capitalize_patching.csv").set_index("shots")
    for name, value in kept[1]["row"].items():
        assert table.loc[1, name] == pytest.approx(value, abs=1e-4)
    steps = pd.read_csv(out / "capitalize_structured_steps.csv")
    assert steps[steps["shots"] == 1]["accuracy"].tolist() == pytest.approx([r["accuracy"] for r in kept[1]["steps"]], abs=1e-4)
    assert kept[0]["row"]["structured"] == pytest.approx(table.loc[0, "structured"], abs=1e-4)  # redone: same numbers
