"""Threads: loading the embedded model from two threads, and one model used from two threads."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import tl_reversed
from conftest import LEGACY, make_tiny
from tl_reversed.core.state import hook_count

PROMPT, TARGET = "The cat sat on", " mat"


def _run_in_threads(*calls):
    """Run each callable in its own thread, started together; returns results and errors."""
    barrier = threading.Barrier(len(calls))
    results, errors = [None] * len(calls), []

    def worker(i, call):
        try:
            barrier.wait()
            results[i] = call()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


@pytest.mark.embedded
def test_threaded_loads_never_patch_weight_processing_process_wide():
    """Two warm loads at once, then a user's own model of SmolLM2's shapes booted the plain
    TransformerLens way: it must keep its own weights, not get SmolLM2's from a leftover patch."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.weight_processing import ProcessWeights
    from transformers import LlamaForCausalLM

    original = ProcessWeights.__dict__["process_weights"]
    smol = tl_reversed.load_model()  # warm the cache (a no-op when it already is)
    assert ProcessWeights.__dict__["process_weights"] is original

    seen, loading = [], threading.Event()

    def watch():
        while loading.is_set():
            current = ProcessWeights.__dict__["process_weights"]
            if current is not original:
                seen.append(current)

    loading.set()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        models, errors = _run_in_threads(tl_reversed.load_model, tl_reversed.load_model)
    finally:
        loading.clear()
        watcher.join()
    assert not errors, errors
    assert not seen, "ProcessWeights.process_weights was replaced process-wide during a load"
    assert ProcessWeights.__dict__["process_weights"] is original
    assert models[0].adapter is not models[1].adapter  # per-bridge state only

    tokens = smol.to_tokens("The capital city of France is")
    with torch.no_grad():
        reference = smol(tokens)
        for model in models:
            torch.testing.assert_close(model(tokens), reference, atol=1e-5, rtol=1e-5)

    # the user's own model: SmolLM2's exact shapes, random weights
    config = type(smol.original_model.config).from_dict(smol.original_model.config.to_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        hf_model = LlamaForCausalLM(config).eval()
    hf_model.config.architectures = ["LlamaForCausalLM"]
    with torch.no_grad():
        own = hf_model(tokens).logits.log_softmax(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        user = TransformerBridge.boot_transformers("my-llama", hf_model=hf_model, tokenizer=smol.tokenizer)
        user.enable_compatibility_mode(disable_warnings=True)
    with torch.no_grad():
        logits = user(tokens)
    assert (logits - reference).abs().max().item() > 1.0  # not SmolLM2's weights
    torch.testing.assert_close(logits.log_softmax(-1), own, atol=1e-4, rtol=1e-4)  # its own


def test_one_model_from_two_threads_serialises_and_restores():
    """Two threads computing RA on one model: same results as one after the other, no error,
    and the model left exactly as found (flags, .grad, train mode, hooks)."""
    model = make_tiny("llama")
    params = list(model.parameters())
    model.train()
    flags = [i % 3 != 0 for i in range(len(params))]
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
    grads = [torch.full_like(p, 0.5) if i % 2 else None for i, p in enumerate(params)]
    for p, g in zip(params, grads):
        p.grad = g
    hooks_before = hook_count(model)
    modes = [m.training for m in model.modules()]

    prompts = [PROMPT, "Q: dog\nA:"]
    targets = [TARGET, " Dog"]
    sequential = [tl_reversed.reversed_attention(model, p, t) for p, t in zip(prompts, targets)]
    for _ in range(3):
        results, errors = _run_in_threads(
            *[lambda p=p, t=t: tl_reversed.reversed_attention(model, p, t) for p, t in zip(prompts, targets)]
        )
        assert not errors, errors
        for got, want in zip(results, sequential):
            torch.testing.assert_close(got.maps, want.maps, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got.loss, want.loss)

    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is g for p, g in zip(params, grads))
    assert [m.training for m in model.modules()] == modes
    assert hook_count(model) == hooks_before


def test_nested_untouched_in_one_thread_still_works():
    from tl_reversed.core.state import untouched

    model = make_tiny("llama")
    model.train()
    with untouched(model):
        with untouched(model):
            assert not any(p.requires_grad for p in model.parameters())
            assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert model.training


def test_untouched_lock_is_per_model():
    from tl_reversed.core import state

    first, second = make_tiny("llama"), make_tiny("llama", seed=1)
    entered = []

    def other():
        with state.untouched(second):
            entered.append(True)

    with state.untouched(first):
        t = threading.Thread(target=other)
        t.start()
        t.join(timeout=60)
        assert entered == [True]  # another model is not blocked by this one's lock
