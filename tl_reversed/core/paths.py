"""Which pass an RA entry point runs: the model's own pass or the memory-bounded one.

Every call that reduces RA (or another per-position quantity) inside the backward takes
``path=``: :func:`tl_reversed.reversed_attention`, ``head_scores(method="ra" | "fa")``,
:func:`tl_reversed.cache_with_grads` with ``keep="norms"`` or query rows, and the backward
lens (:func:`tl_reversed.backward_lens`, :func:`tl_reversed.backward_lens_and_ra`).

* ``"standard"``: the model's own forward and backward; every layer's attention pattern
  is kept for the backward (memory ``layers x heads x tokens^2``).
* ``"bounded"``: every block checkpointed, one block recomputed at a time in the
  backward (:mod:`tl_reversed.core.bounded`); sinks that keep a layer's forward tensors
  keep them only while that block is recomputed (the ``gate`` :func:`pass_for` yields).
  Only ``reversed_attention`` (and ``head_scores``, through it) also runs attention in
  query tiles where the model allows it (no ``[head, T, T]`` tensor at any moment); the
  other entry points recompute a block with its eager attention, so one layer's
  ``[batch, head, T, T]`` pattern exists at a time.
* ``"auto"``: one rule for every entry point (:func:`tl_reversed.core.bounded.choose_path`):
  the bounded pass for norms, query rows or lens vectors when the patterns the standard
  pass would keep for one chunk exceed a threshold (1 GiB,
  :data:`tl_reversed.core.bounded.BOUNDED_ABOVE_BYTES`), the standard pass otherwise.

:func:`bounded_above` moves that threshold for one model inside a ``with`` block (held in
a weak per-model table, restored on exit; nothing global changes)::

    with bounded_above(model, 64 * 2**20):      # 64 MiB for this model only
        reversed_attention(model, long_prompt, target, keep="norms")   # -> bounded pass
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from tl_reversed.core import bounded
from tl_reversed.core.architecture import ModelSpec
from tl_reversed.core.inputs import Batch
from tl_reversed.core.options import RA_PATHS, check_option
from tl_reversed.core.state import model_lock

Gate = Callable[[int], bool]
"""``gate(layer)``: whether a sink's forward hooks in that layer keep their tensors now."""

_thresholds: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()
_thresholds_guard = threading.Lock()


@contextmanager
def bounded_above(model: torch.nn.Module, nbytes: int) -> Iterator[None]:
    """Within the block, ``path="auto"`` takes the bounded pass for ``model`` above ``nbytes``.

    ``nbytes`` replaces :data:`tl_reversed.core.bounded.BOUNDED_ABOVE_BYTES` for this model
    only (0: always bounded where norms or rows are asked for); the previous value comes
    back on exit, also after an exception.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative integer (bytes of stored attention), got {nbytes!r}")
    with _thresholds_guard:
        before = _thresholds.get(model)
        _thresholds[model] = nbytes
    try:
        yield
    finally:
        with _thresholds_guard:
            if before is None:
                _thresholds.pop(model, None)
            else:
                _thresholds[model] = before


def threshold(model: torch.nn.Module) -> int:
    """The bytes of stored patterns above which ``path="auto"`` takes the bounded pass for ``model``."""
    with _thresholds_guard:
        return _thresholds.get(model, bounded.BOUNDED_ABOVE_BYTES)


def resolve_path(
    model: torch.nn.Module,
    spec: ModelSpec,
    batch: Batch,
    *,
    path: str,
    keep: str,
    query_positions: object,
    batch_size: int | None,
) -> Literal["standard", "bounded"]:
    """``path`` checked, and ``"auto"`` resolved by :func:`tl_reversed.core.bounded.choose_path`.

    ``keep="maps"`` with ``query_positions=None`` means whole maps (``auto`` keeps them on
    the standard path); pass ``keep="norms"`` for a call that keeps no map at all.
    """
    check_option("path", path, RA_PATHS)
    per_pass = len(batch) if batch_size is None else min(len(batch), batch_size)
    dtype = next(model.parameters()).dtype
    estimate = bounded.standard_pattern_bytes(spec, spec.n_layers, per_pass, batch.tokens.shape[1], dtype)
    # choose_path compares with BOUNDED_ABOVE_BYTES: shift the estimate so it compares with this model's threshold
    shifted = estimate - threshold(model) + bounded.BOUNDED_ABOVE_BYTES
    return bounded.choose_path(path, keep, query_positions, shifted)  # type: ignore[return-value]


@contextmanager
def pass_for(model: torch.nn.Module, path: str) -> Iterator[Gate | None]:
    """The context of one call's passes on ``path`` (``"standard"`` or ``"bounded"``).

    Yields ``None`` on the standard path, else the gate of the bounded pass: ``gate(layer)``
    is true while block ``layer`` is recomputed in the backward. The bounded pass holds the
    model's lock, so no other thread sees the blocks' swapped forwards.
    """
    if path == "standard":
        yield None
        return
    if path != "bounded":
        raise ValueError(f"pass_for takes a resolved path, 'standard' or 'bounded', got {path!r}")
    with model_lock(model), bounded.checkpointed_blocks(model) as state:
        yield state.recomputing
