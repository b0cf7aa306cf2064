"""The files of the weight cache: the record beside the weights, checks, atomic writes.

Every file a warm load reads is listed in a JSON record beside the processed weights
with its size and sha256; a cache whose record, versions or files do not match is not
used (:func:`valid_cache`, :func:`read_record`). Files are written under a unique
temporary name and renamed into place (:func:`temporary`, :func:`replace`), and the
weights are read and hashed in one pass in the background (:class:`VerifiedRead`,
:func:`tensors_from_buffer`). :mod:`tl_reversed.core.models` decides what to cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import stat
import struct
import threading
import time
from pathlib import Path

import torch

CACHE_FORMAT = "tl-processed-2"
"""What the cached weights are: the state TransformerLens' weight processing returns, and the
Hugging Face model's buffers (keys starting with ``_BUFFER_PREFIX``), which the warm load's
empty skeleton lacks."""


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def temporary(path: Path) -> Path:
    """A sibling of ``path`` to write before renaming it into place, unique to this thread."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial")


def replace(source: Path, target: Path) -> None:
    """Rename ``source`` onto ``target``, clearing a directory that sits where the file belongs."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(source, target)


def prepare_cache(folder: Path) -> tuple[int | None, str | None]:
    """Make ``folder`` ready for writing the cache, before any slow work.

    Returns the permission bits a new file gets there (what the umask leaves of 0o666,
    read off a probe file), or ``None`` and why the folder cannot be written.
    """
    probe = temporary(folder / "probe")
    try:
        if not folder.is_dir() and (folder.is_symlink() or folder.exists()):
            folder.unlink()  # a file or a dangling link where the cache folder belongs
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
            probe.unlink()
        return mode, None
    except OSError as error:
        return None, f"{type(error).__name__}: {error.strerror or error}"


def remove_legacy_cache(folder: Path, dtype: torch.dtype) -> None:
    """Delete the unprocessed weights that tl_reversed 0.1 cached (no longer read), and
    temporary files that a load killed mid-write left behind over an hour ago."""
    for suffix in (".safetensors", ".json"):
        (folder / f"weights-{str(dtype).removeprefix('torch.')}{suffix}").unlink(missing_ok=True)
    for partial in folder.glob("*.partial"):
        try:
            if time.time() - partial.stat().st_mtime > 3600 and partial.is_file():
                partial.unlink()
        except OSError:
            pass


def versions() -> dict[str, str]:
    """The versions whose code decides the processed weights."""
    return {name: importlib.metadata.version(name) for name in ("transformer-lens", "transformers", "torch")}


def read_record(weights: Path) -> dict | None:
    """The JSON record beside a weights file, if it describes a cache this code can use
    and every other file it lists (config, tokenizer) is there, unchanged."""
    try:
        record = json.loads(weights.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT or record.get("versions") != versions():
        return None
    if not files_match(weights.parent, record.get("files")):
        return None
    return record


def file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_of(path)}


def files_match(folder: Path, files) -> bool:
    """Whether each file named in ``files`` is in ``folder`` with the recorded size and sha256."""
    if not isinstance(files, dict) or "config.json" not in files:
        return False
    try:
        for name, expected in files.items():
            path = folder / name
            if Path(name).name != name or not path.is_file() or file_record(path) != expected:
                return False
    except (OSError, TypeError):
        return False
    return True


def valid_cache(weights: Path) -> bool:
    """Whether ``weights`` is a complete, uncorrupted cache made by these versions."""
    record = read_record(weights)
    try:
        return record is not None and weights.is_file() and file_record(weights) == {
            "size": record.get("size"),
            "sha256": record.get("sha256"),
        }
    except OSError:
        return False


class VerifiedRead(threading.Thread):
    """Read a file into memory and hash it in the background (hashlib releases the GIL)."""

    def __init__(self, path: Path, size: int):
        super().__init__(daemon=True)
        self.path, self.size = path, size
        self.buffer: bytearray | None = None
        self.sha256: str | None = None
        self.start()

    def run(self) -> None:
        try:
            buffer, digest, view = bytearray(self.size), hashlib.sha256(), None
            with self.path.open("rb") as f:
                view = memoryview(buffer)
                done = 0
                while done < self.size:
                    n = f.readinto(view[done : done + (1 << 24)])
                    if not n:
                        return  # shorter than recorded: partial
                    digest.update(view[done : done + n])
                    done += n
                if f.read(1):
                    return  # longer than recorded
            self.buffer, self.sha256 = buffer, digest.hexdigest()
        except OSError:
            return


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def tensors_from_buffer(buffer: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in ``buffer``, as views into it (no copy)."""
    (n,) = struct.unpack("<Q", buffer[:8])
    header = json.loads(bytes(buffer[8 : 8 + n]))
    header.pop("__metadata__", None)
    base, out = 8 + n, {}
    for name, info in header.items():
        dtype = DTYPES.get(info["dtype"])
        start, end = info["data_offsets"]
        if dtype is None or (base + start) % dtype.itemsize:
            from safetensors.torch import load

            return load(bytes(buffer))
        count = (end - start) // dtype.itemsize
        flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=base + start) if count else torch.empty(0, dtype=dtype)
        out[name] = flat.view(info["shape"])
    return out


def unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors that share storage with an earlier one (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out
