"""Small argument checkers every public call shares, so one mistake gets one message.

* :func:`check_layers` / :func:`check_layer`: layer indices against the model's spec
  (duplicates, bools and negatives refused; numpy and 0-d tensor integers accepted).
* :func:`positive_int`, :func:`nonnegative_int`, :func:`optional_batch_size`: counts
  (``batch_size``, ``steps``, ``shots``, ``top_k``); bools and floats refused.
* :func:`finite_float`, :func:`finite_floats`: learning rates and other factors (NaN and
  infinities refused).
* :func:`finite_scores`: a tensor of head scores without NaN or infinities.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch

from tl_reversed.core.architecture import ModelSpec


def _is_bool(value: object) -> bool:
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy.bool_
        return True
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


def as_int(value: object, what: str) -> int:
    """``value`` as a Python int: ints, numpy integers and 0-d integer tensors (anything ``operator.index`` takes).

    Bools are refused (``True`` is not layer 1), and so are floats, even whole ones.
    """
    if _is_bool(value):
        raise TypeError(f"{what} must be an integer, got the bool {value!r}")
    if isinstance(value, torch.Tensor) and value.ndim != 0:
        raise TypeError(f"{what} must be an integer, got a tensor of shape {tuple(value.shape)}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})") from None


def check_layers(layers: Sequence[int] | int | None, spec: ModelSpec | int) -> list[int]:
    """The layer indices to use, validated against the model (``spec`` or its number of layers).

    ``None`` means every layer; one integer means that layer. Each index must be an
    integer (numpy integers and 0-d integer tensors are converted) from 0 to
    ``n_layers - 1``, given once: negative indices are refused rather than counted from
    the end, and bools are refused.
    """
    n_layers = spec if isinstance(spec, int) else spec.n_layers
    if layers is None:
        return list(range(n_layers))
    if _is_bool(layers):
        raise TypeError(f"layers must be None, a layer index or a list of layer indices, got {layers!r}")
    if isinstance(layers, str) or isinstance(layers, bytes):
        raise TypeError(f"layers must be None, a layer index or a list of layer indices, got the string {layers!r}")
    single = isinstance(layers, numbers.Integral) or (isinstance(layers, torch.Tensor) and layers.ndim == 0)
    if not single and not hasattr(layers, "__iter__"):
        single = hasattr(layers, "__index__")
    items = [layers] if single else list(layers)  # type: ignore[arg-type]
    if not items:
        raise ValueError("layers is empty: pass None for all layers or a list of layer indices")
    chosen = [as_int(layer, f"layer {layer!r}") for layer in items]
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        negative = " (negative indices are not counted from the end)" if any(b < 0 for b in bad) else ""
        raise ValueError(
            f"layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1}){negative}"
        )
    repeated = sorted({layer for layer in chosen if chosen.count(layer) > 1})
    if repeated:
        raise ValueError(f"layers {chosen} repeat layer(s) {repeated}: name each layer once")
    return chosen


def check_layer(layer: object, spec: ModelSpec | int) -> int:
    """One layer index, validated as in :func:`check_layers`."""
    n_layers = spec if isinstance(spec, int) else spec.n_layers
    index = as_int(layer, "layer")
    if not 0 <= index < n_layers:
        raise ValueError(f"layer {index} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return index


def positive_int(value: object, what: str) -> int:
    """``value`` as an int of at least 1 (``batch_size``, ``steps``, ``top_k``...)."""
    number = as_int(value, what)
    if number < 1:
        raise ValueError(f"{what} must be at least 1, got {number}")
    return number


def nonnegative_int(value: object, what: str) -> int:
    """``value`` as an int of at least 0 (``shots``...)."""
    number = as_int(value, what)
    if number < 0:
        raise ValueError(f"{what} must be 0 or more, got {number}")
    return number


def optional_batch_size(value: object, what: str = "batch_size") -> int | None:
    """A batch size: ``None`` (everything at once) or an int of at least 1."""
    return None if value is None else positive_int(value, what)


def finite_float(value: object, what: str) -> float:
    """``value`` as a finite float (a learning rate, a factor); NaN and infinities refused."""
    if _is_bool(value):
        raise TypeError(f"{what} must be a number, got the bool {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {value!r} ({type(value).__name__})") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {number}: give a real value such as -10 or 1")
    return number


def finite_floats(values: Sequence[object], what: str) -> list[float]:
    """Each of ``values`` as a finite float (a sweep of learning rates); an empty list refused."""
    if isinstance(values, str) or not hasattr(values, "__iter__"):
        raise TypeError(f"{what} must be a list of numbers, got {values!r}")
    numbers_ = [finite_float(v, f"{what}[{i}]") for i, v in enumerate(values)]  # type: ignore[union-attr]
    if not numbers_:
        raise ValueError(f"{what} is empty: give at least one value")
    return numbers_


def finite_scores(scores: torch.Tensor, what: str = "scores") -> torch.Tensor:
    """``scores`` unchanged, after checking it holds no NaN or infinity (a ranking cannot order those)."""
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        where = [tuple(i) for i in bad.nonzero().tolist()[:5]]
        raise ValueError(
            f"{what} has {int(bad.sum())} NaN or infinite entries (first at {where}): a ranking cannot order "
            "them; recompute the scores, or replace those entries (e.g. torch.nan_to_num) before ranking"
        )
    return scores
