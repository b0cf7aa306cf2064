"""Results are data: every result type saves to one file and loads back unchanged.

A result (a dataclass such as :class:`~tl_reversed.ReversedAttention` or
:class:`~tl_reversed.experiments.ranking.HeadScores`) inherits :class:`Result` and so gets
``save(path)`` and ``Result.load(path)``. The file is one ``safetensors`` file:

- every tensor field is a tensor of the file (dtype and shape kept exactly);
- everything else goes, as JSON, into the file's ``__metadata__`` under the key
  ``"tl_reversed"``: the type tag (the class name), the format version and the fields.
  ``None`` tensors are recorded as absent, tuples come back as tuples and dicts keep
  their key types (e.g. ``int`` token ids);
- a result nested in another (the :class:`TopTokens` of a ``BackwardLens``, the
  ``AttentionMaps`` of a ``PatchingSweep``) is flattened: its tensors are stored under
  ``"<field>.<name>"``.

The file is written to a temporary name beside the target and moved into place with
``os.replace``, so a killed process never leaves a half-written result. ``load`` says
plainly what is wrong with a file it cannot read: another result type, a newer format,
a truncated or corrupted file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

FORMAT_VERSION = 1
"""The layout ``save`` writes; ``load`` reads this version and every older one."""

METADATA_KEY = "tl_reversed"

_REGISTRY: dict[str, type[Result]] = {}

R = TypeVar("R", bound="Result")


class Result:
    """Mixin for dataclass results: ``save(path)`` and ``load(path)`` through one safetensors file."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def save(self, path: str | os.PathLike) -> Path:
        """Write this result to ``path`` (a ``.safetensors`` file; parent folders are created).

        Returns the path written. The write is atomic: the file is complete or absent.
        """
        tensors, fields = _flatten(self, "")
        header = {"type": type(self).__name__, "format": FORMAT_VERSION, "fields": fields}
        return write(path, tensors, {METADATA_KEY: json.dumps(header, allow_nan=True)})

    @classmethod
    def load(cls: type[R], path: str | os.PathLike) -> R:
        """Read a result that :meth:`save` wrote; the file must hold this type."""
        header, tensors = read(path)
        found = header.get("type")
        if found != cls.__name__:
            raise ValueError(
                f"{path} holds a {found}, not a {cls.__name__}: load it with {found}.load "
                f"(or tl_reversed.core.results.load_result, which reads any result type)"
            )
        return _build(cls, header["fields"], tensors, "", path)  # type: ignore[return-value]


def load_result(path: str | os.PathLike) -> Result:
    """Read any result :meth:`Result.save` wrote, whatever its type (its module must be imported)."""
    header, tensors = read(path)
    found = header.get("type")
    if found not in _REGISTRY:
        _import_result_modules()
    if found not in _REGISTRY:
        raise ValueError(f"{path} holds a {found!r}, which this version of tl_reversed does not know: upgrade tl_reversed")
    return _build(_REGISTRY[found], header["fields"], tensors, "", path)


def _import_result_modules() -> None:
    import tl_reversed.experiments.attention_patching  # noqa: F401
    import tl_reversed.experiments.perturbation  # noqa: F401
    import tl_reversed.experiments.ranking  # noqa: F401
    import tl_reversed.lens.backward_lens  # noqa: F401
    import tl_reversed.lens.flow_results  # noqa: F401


# --------------------------------------------------------------------------- the file


def write(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` and string ``metadata`` as one safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """The JSON header and the tensors of a result file; a clear ``ValueError`` for a bad file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no result file at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:  # type: ignore[no-untyped-call]
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error type, or OSError/ValueError on junk
        raise ValueError(
            f"{path} is not a readable result file (truncated or corrupted: {error}); "
            "recompute the result and save it again"
        ) from error
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"{path} is a safetensors file but not a tl_reversed result (no {METADATA_KEY!r} metadata): "
            "load it with safetensors.torch.load_file"
        )
    try:
        header = json.loads(metadata[METADATA_KEY])
        version = header["format"]
        header["fields"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} has a corrupted tl_reversed header ({error}); recompute the result and save it again"
        ) from error
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ValueError(
            f"{path} was written in result format {version!r}, but this version of tl_reversed reads formats "
            f"1 to {FORMAT_VERSION}: upgrade tl_reversed (pip install -U tl-reversed) to load it"
        )
    return header, tensors


# --------------------------------------------------------------------------- fields


def _flatten(result: object, prefix: str) -> tuple[dict[str, Tensor], dict]:
    """The tensors of a dataclass result (keys prefixed) and the JSON description of its fields."""
    if not dataclasses.is_dataclass(result):
        raise TypeError(f"{type(result).__name__} is not a dataclass: only dataclass results can be saved")
    tensors: dict[str, Tensor] = {}
    fields: dict[str, dict] = {}
    storages: set[int] = set()
    for item in dataclasses.fields(result):
        value = getattr(result, item.name)
        key = prefix + item.name
        if isinstance(value, Tensor):
            tensor = value.detach().cpu().contiguous()
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in storages and tensor.numel():
                tensor = tensor.clone()  # safetensors refuses tensors that share memory
            storages.add(pointer)
            tensors[key] = tensor
            fields[item.name] = {"kind": "tensor"}
        elif isinstance(value, Result):
            inner, described = _flatten(value, key + ".")
            tensors.update(inner)
            fields[item.name] = {"kind": "result", "type": type(value).__name__, "fields": described}
        else:
            fields[item.name] = {"kind": "value", "value": _encode(value, key)}
    return tensors, fields


def _build(cls: type, fields: dict, tensors: dict[str, Tensor], prefix: str, path: object) -> object:
    known = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"{path} has fields {unknown} that {cls.__name__} does not know: it was written by a newer "
            "tl_reversed; upgrade tl_reversed to load it"
        )
    values = {}
    for name, entry in fields.items():
        key = prefix + name
        kind = entry.get("kind")
        if kind == "tensor":
            if key not in tensors:
                raise ValueError(f"{path} lacks the tensor {key!r}: the file is corrupted; recompute the result")
            values[name] = tensors[key]
        elif kind == "result":
            inner = _REGISTRY.get(entry.get("type", ""))
            if inner is None:
                raise ValueError(f"{path} nests an unknown result type {entry.get('type')!r}: upgrade tl_reversed")
            values[name] = _build(inner, entry["fields"], tensors, key + ".", path)
        elif kind == "value":
            values[name] = _decode(entry["value"])
        else:
            raise ValueError(f"{path} has a field {key!r} of unknown kind {kind!r}: the file is corrupted")
    return cls(**values)


def _encode(value: object, where: str) -> object:
    """A JSON value that :func:`_decode` turns back into ``value`` (tuples and dict key types kept)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict):
        return {"dict": [[_encode(k, where), _encode(v, where)] for k, v in value.items()]}
    raise TypeError(
        f"cannot save {where}: a {type(value).__name__} is neither a tensor, a result nor a JSON value "
        "(None, bool, int, float, str, list, tuple, dict)"
    )


def _decode(value: object) -> object:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "tuple" in value:
            return tuple(_decode(v) for v in value["tuple"])
        return {_decode(k): _decode(v) for k, v in value["dict"]}
    return value


__all__ = ["FORMAT_VERSION", "Result", "load_result"]
