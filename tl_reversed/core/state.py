"""Leave the model as we found it.

Every public call runs inside :func:`untouched`: parameters stop requiring grad for
the duration (the backward pass flows from the embeddings instead, so no weight
gradient is ever computed), the model is put in eval mode, and on the way out,
also after an exception, every ``requires_grad`` flag, every ``.grad``, every
module's train/eval mode and the set of hooks on each hook point are restored.

Threads: each model has its own re-entrant lock, held for the whole guarded block, so
calls on one model from several threads run one after the other (each sees and leaves
the model as it found it), while calls on different models still run side by side.
Nesting :func:`untouched` in one thread is fine. The locks live in a
``weakref.WeakKeyDictionary`` keyed by the model (nothing is stored on the model) and
go away with it. Hooks or flags that other code changes on the model from another
thread, outside tl_reversed's calls, are not guarded.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_locks: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The re-entrant lock that :func:`untouched` holds on ``model`` (one per model)."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


def _hook_handles(model: torch.nn.Module) -> dict[str, tuple[int, int, int, int]]:
    """Count the hooks on each hook point (TransformerLens lists and torch dicts)."""
    counts = {}
    for name, point in model.hook_dict.items():  # type: ignore[attr-defined]
        counts[name] = (
            len(getattr(point, "fwd_hooks", ())),
            len(getattr(point, "bwd_hooks", ())),
            len(point._forward_hooks),
            len(point._backward_hooks),
        )
    return counts


def hook_count(model: torch.nn.Module) -> int:
    """Total number of hooks attached to the model's hook points (for leak checks)."""
    return sum(sum(c[:2]) for c in _hook_handles(model).values())


def _modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module whose train/eval mode the model's ``train()`` sets.

    A TransformerBridge keeps the wrapped Hugging Face model outside its module tree
    (``original_model``) and its ``train()`` reaches it explicitly, so it is listed too.
    """
    roots = [model]
    original = getattr(model, "original_model", None)
    if isinstance(original, torch.nn.Module):
        roots.append(original)
    found: dict[int, torch.nn.Module] = {}
    for root in roots:
        for module in root.modules():
            found.setdefault(id(module), module)
    return list(found.values())


@contextmanager
def untouched(model: torch.nn.Module) -> Iterator[None]:
    """Run a block with frozen parameters in eval mode, then restore everything.

    Holds the model's lock (:func:`model_lock`) throughout: another thread's call on the
    same model waits until this block has restored it.
    """
    with model_lock(model):
        with _frozen(model):
            yield


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = [(module, module.training) for module in _modules(model)]
    before = _hook_handles(model)
    try:
        for p in params:
            p.requires_grad_(False)
        if any(training for _, training in modes):  # eval() walks thousands of bridge modules: skip it when a no-op
            model.eval()
        yield
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for module, training in modes:
            if module.training != training:
                module.training = training
        _remove_new_hooks(model, before)


def _remove_new_hooks(model: torch.nn.Module, before: dict[str, tuple[int, int, int, int]]) -> None:
    """Remove hooks added since ``before`` (normally none: we add hooks in contexts)."""
    for name, point in model.hook_dict.items():  # type: ignore[attr-defined]
        fwd, bwd, _, _ = before.get(name, (0, 0, 0, 0))
        for attr, keep in (("fwd_hooks", fwd), ("bwd_hooks", bwd)):
            handles = getattr(point, attr, None)
            while handles is not None and len(handles) > keep:
                handle = handles.pop()
                remove = getattr(handle, "hook", handle)
                if hasattr(remove, "remove"):
                    remove.remove()
