"""LoRA under segment masks (tl_reversed.experiments.segment_lora) and ``tl-reversed segments``, on tiny models."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import LEGACY, make_tiny

import tl_reversed
from tl_reversed.commands.cli import main
from tl_reversed.core.hf_copy import causal_allowed, hf_copy, masked_logits
from tl_reversed.core.segments import prefill_mask, tokenize_pieces
from tl_reversed.experiments import segment_lora as sl

pytestmark = pytest.mark.skipif(LEGACY, reason="LoRA training runs on a TransformerBridge's Hugging Face model")

TASK = "choose_middle_of_3"


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def train():
    return sl.segment_examples(TASK, "train", n=16)


def _snapshot(model):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    hooks = sum(len(getattr(h, "fwd_hooks", [])) + len(getattr(h, "bwd_hooks", [])) for h in model.hook_dict.values())
    return params, flags, grads, modes, hooks


def _assert_same(before, after):
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][n], after[0][n]) for n in before[0])
    assert before[1:] == after[1:]


def test_the_copy_and_its_4d_causal_mask_reproduce_the_models_logits(tiny):
    copy = hf_copy(tiny)
    tokens = torch.cat([tiny.to_tokens("Q: ab, cd, ef\nA:"), tiny.to_tokens("xyz 123 abc def!")], dim=0)
    with torch.no_grad():
        own = tiny(tokens)
        masked = masked_logits(copy, tokens, causal_allowed(2, tokens.shape[1]))
    torch.testing.assert_close(masked, own, rtol=0, atol=1e-6)
    # the causal variant of encode builds exactly that mask for an unpadded prompt
    data = sl.encode(tiny, sl.segment_examples(TASK, "test", n=1), "causal")
    n = int(data.total_len[0])
    assert torch.equal(data.allowed[0, :n, :n], torch.ones(n, n, dtype=torch.bool).tril())


def test_segment_mask_of_encode_is_the_prefill_mask_then_causal(tiny):
    example = sl.segment_examples(TASK, "test", n=1)[0]
    data = sl.encode(tiny, [example], "segments")
    _, ids = tokenize_pieces(tiny, example.pieces)
    n = int(data.total_len[0])
    assert torch.equal(data.allowed[0], prefill_mask(ids[None], total_len=n)[0])
    p = len(ids)
    assert bool(data.allowed[0, 0, p - 1]) is False  # segment 0 does not see segment 1
    assert bool(data.allowed[0, p - 2, p - 1]) is True  # inside segment 1: a later token is visible
    assert torch.equal(data.allowed[0, p:], torch.ones(n, n, dtype=torch.bool).tril()[p:])  # answers: causal, see all


def test_lora_starts_as_a_no_op(tiny):
    copy = hf_copy(tiny)
    tokens = tiny.to_tokens("Q: ab, cd, ef\nA:")
    allowed = causal_allowed(1, tokens.shape[1])
    with torch.no_grad():
        base = masked_logits(copy, tokens, allowed)
        adapted = sl.add_lora(copy, rank=4, seed=3)
        assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) > 0
        assert torch.equal(masked_logits(adapted, tokens, allowed), base)


def test_add_lora_seeds_its_own_adapters_and_leaves_every_global_generator_alone(tiny, monkeypatch):
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)  # what torch.manual_seed would call
    state = torch.get_rng_state()
    first, again, other = (sl.add_lora(hf_copy(tiny), rank=4, seed=seed) for seed in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), state) and reseeded == []

    def lora_a(model):
        return [p for n, p in model.named_parameters() if "lora_A" in n]

    assert len(lora_a(first)) > 0
    assert all(torch.equal(a, b) for a, b in zip(lora_a(first), lora_a(again)))
    assert not any(torch.equal(a, b) for a, b in zip(lora_a(first), lora_a(other)))


@pytest.fixture(scope="module")
def sharp():
    """A tiny model whose unembedding is 20x larger: the random one's logits span well under one nat,
    so no attention update can lower its loss by much (the final norm fixes the residual's scale)."""
    model = make_tiny("llama", seed=1)
    with torch.no_grad():
        model.original_model.lm_head.weight.mul_(20.0)
    return model


@pytest.mark.parametrize("mask", ["segments", "causal"])
def test_a_few_steps_lower_the_training_loss(sharp, train, mask):
    tiny = sharp
    data = sl.encode(tiny, train, mask)
    with torch.no_grad():
        before = float(sl.answer_loss(hf_copy(tiny), data))
    lora = sl.train_segment_lora(tiny, train, mask, steps=12, batch_size=8, lr=1e-2, rank=4, progress=False)
    with torch.no_grad():
        after = float(sl.answer_loss(lora.hf_model, data))
    assert lora.run.losses.shape == (12,)
    assert after < 0.7 * before, (before, after)


def test_same_seed_same_run_and_both_masks_see_the_same_batches(tiny, train):
    a = sl.train_segment_lora(tiny, train, "causal", steps=3, batch_size=4, lr=1e-2, seed=5, progress=False)
    b = sl.train_segment_lora(tiny, train, "causal", steps=3, batch_size=4, lr=1e-2, seed=5, progress=False)
    assert torch.equal(a.run.losses, b.run.losses)
    c = sl.train_segment_lora(tiny, train, "segments", steps=1, batch_size=4, lr=1e-2, seed=5, progress=False)
    first = sl._batches(len(train), 4, 1, 5)[0]
    assert float(c.run.losses[0]) == pytest.approx(
        float(sl.answer_loss(hf_copy(tiny), sl.encode(tiny, [train[i] for i in first], "segments"))), abs=1e-6
    )


def test_mas_logits_depend_on_later_tokens_of_the_segment_and_causal_ones_do_not(tiny, train):
    example = sl.segment_examples(TASK, "test", n=1)[0]
    changed = sl.SegmentExample((example.pieces[0], example.pieces[1][:-4] + "zz" + example.pieces[1][-2:]), example.target)
    for mask in ("segments", "causal"):
        lora = sl.train_segment_lora(tiny, train, mask, steps=2, batch_size=4, lr=1e-2, progress=False)
        one, two = (sl.encode(tiny, [e], mask, with_target=False) for e in (example, changed))
        first_change = int((one.tokens[0] != two.tokens[0]).nonzero()[0])
        p = int(one.prompt_len[0])
        start = len(tokenize_pieces(tiny, example.pieces[:1])[0])  # the query segment's first token
        assert start < first_change < p
        a, b = lora.logits(one.tokens, one.allowed), lora.logits(two.tokens, two.allowed)
        earlier_in_segment = (a[0, start:first_change] - b[0, start:first_change]).abs().max()
        earlier_segment = (a[0, :start] - b[0, :start]).abs().max()
        assert float(earlier_segment) == 0.0  # no mask lets a segment see a later one
        if mask == "segments":
            assert earlier_in_segment > 1e-3
        else:
            assert earlier_in_segment == 0.0


def test_adapters_save_and_load_to_identical_logits(tiny, train, tmp_path):
    lora = sl.train_segment_lora(tiny, train, "segments", steps=3, batch_size=4, lr=1e-2, task=TASK, progress=False)
    lora.save(tmp_path / "adapter")
    loaded = sl.SegmentLoRA.load(tiny, tmp_path / "adapter")
    data = sl.encode(tiny, train[:5], "segments")
    assert torch.equal(loaded.logits(data.tokens, data.allowed), lora.logits(data.tokens, data.allowed))
    with torch.no_grad():
        base = masked_logits(hf_copy(tiny), data.tokens, data.allowed)
    assert (loaded.logits(data.tokens, data.allowed) - base).abs().max() > 1e-4  # the adapter is really applied
    assert torch.equal(loaded.run.losses, lora.run.losses)
    assert (loaded.run.task, loaded.mask, loaded.run.settings) == (TASK, "segments", lora.run.settings)
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        sl.SegmentLoRA.load(tiny, tmp_path)
    with pytest.raises(ValueError, match="was trained on another model"):
        sl.SegmentLoRA.load(make_tiny("llama", seed=7), tmp_path / "adapter")


def test_the_users_model_is_left_as_found_also_after_an_error(tiny, train):
    tiny.blocks[0].train()  # an unusual state, to be kept
    try:
        before = _snapshot(tiny)
        lora = sl.train_segment_lora(tiny, train, "segments", steps=2, batch_size=4, lr=1e-2, progress=False)
        sl.evaluate_segment_lora(tiny, TASK, {"MAS-LoRA": lora}, train[:4])
        _assert_same(before, _snapshot(tiny))
        with pytest.raises(ValueError, match="LoRA targets"):
            sl.train_segment_lora(tiny, train, "segments", steps=2, targets=["no_such_module"], progress=False)
        _assert_same(before, _snapshot(tiny))
    finally:
        tiny.blocks[0].eval()


def test_accuracy_on_the_copy_is_the_bridges_own_top_1(tiny):
    test = sl.segment_examples(TASK, "test", n=6)
    got = sl.segment_accuracy(tiny, test, "causal", batch_size=4)
    expected = []
    for example in test:
        tokens, _ = tokenize_pieces(tiny, example.pieces)
        with torch.no_grad():
            top = tiny(tokens[None])[0, -1].argmax()
        expected.append(bool(top == tiny.to_tokens(example.target, prepend_bos=False)[0, 0]))
    assert got.tolist() == expected


def test_clear_errors(tiny):
    with pytest.raises(ValueError, match="does not accept a custom 4-D attention mask"):
        hf_copy(make_tiny("opt"))
    with pytest.raises(ValueError, match="mask must be one of"):
        sl.encode(tiny, sl.segment_examples(TASK, "test", n=1), "bidirectional")
    with pytest.raises(ValueError, match="no instruction for task 'antonym'"):
        sl.segment_examples("antonym")
    with pytest.raises(TypeError, match="wraps no Hugging Face model"):
        hf_copy(torch.nn.Linear(2, 2))


def test_a_missing_peft_is_a_clear_import_error_before_any_work(tiny, train, monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # what an environment without peft gives: import raises ImportError

    def no_work(*args, **kwargs):
        raise AssertionError("work began before peft was found missing")

    monkeypatch.setattr(sl, "hf_copy", no_work)
    monkeypatch.setattr(sl, "check_mask", no_work)
    monkeypatch.setattr(tl_reversed, "load_model", no_work)
    message = r'LoRA under segment masks needs peft: pip install "tl_reversed\[segments\]"'
    with pytest.raises(ImportError, match=message):
        sl.train_segment_lora(tiny, train, steps=1)
    with pytest.raises(ImportError, match=message):
        sl.add_lora(torch.nn.Linear(2, 2))
    with pytest.raises(ImportError, match=message):
        sl.SegmentLoRA.load(tiny, tmp_path)
    out = tmp_path / "segments"
    assert main(["segments", "train", "--tasks", TASK, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == 'tl-reversed segments: error: LoRA under segment masks needs peft: pip install "tl_reversed[segments]"\n'
    assert not out.exists()


def test_cli_train_eval_end_to_end(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tl_reversed, "load_model", lambda name=None, device=None: tiny)
    out = str(tmp_path / "segments")
    common = ["--tasks", TASK, "--out", out]
    assert main(["segments", "eval", *common]) == 2
    assert "run `tl-reversed segments train`" in capsys.readouterr().err
    train_args = ["segments", "train", *common, "--steps", "3", "--batch-size", "4", "--n-train", "8", "--lr", "0.01"]
    assert main(train_args) == 0
    assert main(train_args) == 0  # resumes: both adapters kept
    assert capsys.readouterr().out.count("kept ") == 2
    assert main(["segments", "eval", *common, "--n-test", "6"]) == 0
    table = pd.read_csv(tmp_path / "segments" / "segments.csv")
    assert list(table["model"] + " / " + table["mask"]) == ["base / causal", "base / segments", "causal-LoRA / causal", "MAS-LoRA / segments"]
    test = sl.segment_examples(TASK, "test", n=6)
    for _, row in table.iterrows():
        folder = tmp_path / "segments" / "adapters" / f"{TASK}-{row['mask']}"
        adapted = None if row["model"] == "base" else sl.SegmentLoRA.load(tiny, folder)
        expected = float(sl.segment_accuracy(tiny, test, row["mask"], adapted=adapted).float().mean())
        assert row["accuracy"] == pytest.approx(expected, abs=1e-4)
        assert row["n_test"] == 6 and row["n_train"] == 8
    correct = {c: sl.segment_accuracy(tiny, test, c.split(" / ")[1], adapted=sl.SegmentLoRA.load(tiny, tmp_path / "segments" / "adapters" / f"{TASK}-{c.split(' / ')[1]}"))
               for c in ("MAS-LoRA / segments", "causal-LoRA / causal")}  # fmt: skip
    only_mas = int((correct["MAS-LoRA / segments"] & ~correct["causal-LoRA / causal"]).sum())
    only_causal = int((correct["causal-LoRA / causal"] & ~correct["MAS-LoRA / segments"]).sum())
    assert (table["mas_only"] == only_mas).all() and (table["causal_only"] == only_causal).all()
    train_table = pd.read_csv(tmp_path / "segments" / "train.csv")
    assert list(train_table["steps"]) == [3, 3]
    assert (tmp_path / "segments" / "segments.md").read_text().count("| choose_middle_of_3 | 8 / 6 |") == 1
    assert main(["segments", "train", "--tasks", "antonym", "--out", out]) == 2
    assert "no instruction segment for ['antonym']" in capsys.readouterr().err


def test_greedy_generation_on_the_copy_is_segments_generate(tiny):
    from tl_reversed import segments

    pieces = ["Choose the middle word of the three.\n", "Q: ab, cd, ef\nA:"]
    expected = segments.generate(tiny, pieces, max_new_tokens=6).text
    assert sl.segment_generate(tiny, pieces, max_new_tokens=6) == expected


@pytest.mark.embedded
def test_the_copy_of_the_embedded_model_has_its_exact_logits(embedded_model):
    """SmolLM2 ties its embeddings; after the bridge folds the final norm into the unembedding they
    differ (a copy that loaded one into both was off by 15 nats when this was written)."""
    copy = hf_copy(embedded_model)
    tokens = embedded_model.to_tokens("Choose the middle word of the three.\nQ: yacht, umbrella, easel\nA:")
    with torch.no_grad():
        own = embedded_model(tokens)
        assert torch.equal(copy(input_ids=tokens).logits, own)
        torch.testing.assert_close(masked_logits(copy, tokens, causal_allowed(1, tokens.shape[1])), own, rtol=0, atol=1e-5)


def test_cli_eval_resumes_finished_tasks_and_redoes_them_after_retraining(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tl_reversed, "load_model", lambda name=None, device=None: tiny)
    common = ["--tasks", TASK, "--out", str(tmp_path)]
    train_args = ["segments", "train", *common, "--steps", "2", "--batch-size", "4", "--n-train", "8"]
    assert main(train_args) == 0
    calls = []
    real = sl.evaluate_segment_lora
    monkeypatch.setattr(sl, "evaluate_segment_lora", lambda *a, **k: calls.append(1) or real(*a, **k))
    from tl_reversed.commands.common import Checkpoint

    monkeypatch.setattr(Checkpoint, "clear", lambda self: None)  # as if the run had been killed after the unit
    assert main(["segments", "eval", *common, "--n-test", "4"]) == 0
    first = pd.read_csv(tmp_path / "segments.csv")
    assert main(["segments", "eval", *common, "--n-test", "4"]) == 0
    assert len(calls) == 1  # the finished task was read back, not recomputed
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "segments.csv"), first)
    assert main([*train_args[:-2], "--n-train", "6"]) == 0  # retrained: other settings
    assert main(["segments", "eval", *common, "--n-test", "4"]) == 0
    assert len(calls) == 2
    assert (pd.read_csv(tmp_path / "segments.csv")["n_train"] == 6).all()
