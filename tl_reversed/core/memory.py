"""Estimate the peak memory of a forward and backward pass before running it.

Long prompts fill memory fast: eager attention keeps every layer's ``[batch, head,
query_pos, key_pos]`` pattern for the backward pass (about 2-3 such tensors per layer:
scores, pattern, softmax output), so the peak grows with the square of the prompt
length. :func:`check_memory` compares :func:`estimate_peak` with the memory available
and raises :class:`WouldRunOutOfMemory` *before* the pass, with the way out.

The estimate, in bytes, for one mini-batch of ``batch`` rows of ``tokens`` positions::

    patterns    = PATTERN_COPIES * n_layers * n_heads * batch * tokens**2 * bytes
    activations = ACTIVATION_FLOATS * n_layers * d_model * batch * tokens * bytes
    logits      = LOGIT_COPIES * d_vocab * 4 * (batch * tokens with a metric, else the target tokens)
    pass        = patterns + activations + logits + MAP_COPIES * maps(batch) + 2 * maps(earlier rows)
    peak        = max(pass, 4 * maps(all rows))          # keep="maps": the result is assembled at the end

``maps(rows) = rows * layers * n_heads * tokens**2 * 4`` (RA and pattern maps are kept in
float32) and is zero with ``keep="norms"``; ``bytes`` is the model dtype's size.

Calibration (how the constants were fitted): on the embedded SmolLM2-135M (30 layers x 9
heads, d_model 576, d_mlp 1536, vocabulary 49,152, float32, CPU, one prompt, a metric so
every position is unembedded) the peaks measured by ``benchmarks/b4_growth.py``
(docs/benchmarks.md, B4) are 51, 141, 306, 731, 1636 MiB (``keep="norms"``) and 51, 149,
339, 856, 2629 MiB (``keep="maps"``) at 32, 64, 128, 256, 512 tokens, and 8.9 GB
(``keep="norms"``) and 13.4 GB (``keep="maps"``) at 1,500 tokens. Fitting
``a * tokens + c * (layers * heads * tokens**2 * 4 B)`` through 512 and 1,500 tokens
(keep="norms") gives ``c = 2.42`` pattern copies and ``a = 1.92`` MiB per token, split
into three float32 copies of the logits row (0.56 MiB) and 1.36 MiB of activations
(``20.6 * 30 * 576`` floats; the ~1.4 MB per token of DESIGN.md section 7); ``keep="maps"``
adds 2.5 map copies. B4's layer sweep (tiny Llama, d_model 256, d_mlp 512, 8 heads, 4 x 128
tokens, 2 to 32 layers: 37 -> 553 MiB with ``keep="norms"``, 54 -> 679 MiB with ``keep="maps"``)
gives 23.6 values of ``d_model`` per layer and position, close to SmolLM2's 20.6: the
activations are counted in units of ``d_model`` (both models have ``d_mlp`` 2-2.7 ``d_model``).
The estimate is then within 31% of every measured point above (the worst are the smallest:
32 tokens, 51 MiB, over by 31%; 4 layers, 86 MiB, under by 29%), within 21% from 64 tokens
and 8 layers up, and within 12% at 512 and 1,500 tokens. It is an estimate:
allocator slack, other tensors and other processes are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tl_reversed.core.engine import model_devices

PATTERN_COPIES = 2.42
"""``[batch, head, query, key]`` tensors each layer keeps for the backward pass (fitted, see the module docstring)."""
ACTIVATION_FLOATS = 20.6
"""Per layer and position, activation values kept for the backward pass, in units of ``d_model`` (fitted)."""
LOGIT_COPIES = 3
"""Float32 ``[d_vocab]`` rows per unembedded position: logits, log-softmax, their gradient."""
MAP_COPIES = 2.5
"""``keep="maps"``: float32 map copies per mini-batch row during the pass (RA and pattern, plus temporaries; fitted)."""


class WouldRunOutOfMemory(MemoryError):
    """The estimated peak memory of a call exceeds the memory available: it was not run."""


@dataclass(frozen=True)
class Shapes:
    """The model sizes the estimate reads (see :func:`Shapes.of`)."""

    n_layers: int
    n_heads: int
    d_model: int
    d_vocab: int
    bytes_per_value: int = 4

    @classmethod
    def of(cls, model: object) -> Shapes:
        """The shapes of a TransformerBridge or HookedTransformer."""
        cfg = model.cfg  # type: ignore[attr-defined]
        param = next(model.parameters())  # type: ignore[attr-defined]
        return cls(
            n_layers=int(cfg.n_layers),
            n_heads=int(cfg.n_heads),
            d_model=int(cfg.d_model),
            d_vocab=int(cfg.d_vocab),
            bytes_per_value=param.element_size(),
        )


def estimate_peak(
    shapes: Shapes,
    *,
    batch: int,
    tokens: int,
    rows: int | None = None,
    keep: str = "norms",
    kept_layers: int | None = None,
    full_logits: bool = True,
    target_tokens: int | None = None,
    extra: int = 0,
) -> int:
    """The estimated peak memory of a pass, in bytes (see the module docstring for the formula).

    Args:
        shapes: the model's :class:`Shapes`.
        batch: rows per forward/backward pass (the mini-batch).
        tokens: positions per row (the padded width).
        rows: rows of the whole call (default ``batch``); ``keep="maps"`` keeps maps for all of them.
        keep: ``"maps"`` or ``"norms"``, as in :func:`tl_reversed.core.reversed_attention`.
        kept_layers: layers whose maps are kept (default all).
        full_logits: whether every position is unembedded (a metric); else only ``target_tokens``.
        target_tokens: target tokens per mini-batch where ``full_logits`` is False (default ``batch``).
        extra: bytes the caller keeps besides (e.g. the backward lens's vectors).
    """
    rows = batch if rows is None else rows
    layers = shapes.n_layers if kept_layers is None else kept_layers
    square = shapes.n_heads * tokens * tokens
    patterns = PATTERN_COPIES * shapes.n_layers * square * batch * shapes.bytes_per_value
    activations = ACTIVATION_FLOATS * shapes.n_layers * shapes.d_model * batch * tokens * shapes.bytes_per_value
    unembedded = batch * tokens if full_logits else (batch if target_tokens is None else target_tokens)
    logits = LOGIT_COPIES * shapes.d_vocab * 4 * unembedded
    pass_peak = patterns + activations + logits + extra
    result_peak = 0.0
    if keep == "maps":
        one_row = layers * square * 4
        pass_peak += MAP_COPIES * batch * one_row + 2 * max(rows - batch, 0) * one_row
        result_peak = 4 * rows * one_row + extra
    return int(max(pass_peak, result_peak))


def available_memory(device: torch.device | str) -> tuple[int | None, str]:
    """Free memory on ``device`` in bytes and where it was read (None where it cannot be read)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "torch.cuda.mem_get_info"
    if device.type != "cpu":
        return None, f"not measured on {device.type}"
    try:
        import psutil
    except ImportError:
        psutil = None  # type: ignore[assignment]
    if psutil is not None:
        return int(psutil.virtual_memory().available), "psutil available memory"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
    except OSError:
        pass
    return None, "not measured on this system"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_memory(
    estimate: int, device: torch.device | str | list[torch.device], *, what: str, way_out: str
) -> None:
    """Raise :class:`WouldRunOutOfMemory` if ``estimate`` bytes exceed the memory available on ``device``.

    ``device`` may be a list (a model split across devices, whose layers keep their
    activations where they run): the estimate is then compared with the memory available
    on all of them together, a rough check, since a split is rarely even.
    ``way_out`` names what to change (``keep="norms"``, a smaller ``batch_size``, a shorter
    prompt); it ends the message, after the estimate and the memory available.
    """
    devices = [torch.device(d) for d in (device if isinstance(device, list) else [device])]
    found = [available_memory(d) for d in devices]
    if any(free is None for free, _ in found):
        return
    free = sum(int(f) for f, _ in found)  # type: ignore[arg-type]
    if estimate <= free:
        return
    where = ", ".join(str(d) for d in devices)
    source = ", ".join(sorted({s for _, s in found}))
    raise WouldRunOutOfMemory(
        f"{what} would need about {_gib(estimate)} at its peak (estimated from the model's shapes and the "
        f"prompt length), but only {_gib(free)} is available on {where} ({source}): {way_out}; "
        "or pass memory_check=False to run it anyway"
    )


def enabled(memory_check: bool) -> bool:
    """``memory_check`` itself, once checked to be a bool."""
    if not isinstance(memory_check, bool):
        raise TypeError(f"memory_check must be True or False, got {memory_check!r}")
    return memory_check


def check_pass(
    model: torch.nn.Module,
    batch: object,
    parts: list[list[int]],
    *,
    what: str,
    keep: str = "norms",
    kept_layers: int | None = None,
    full_logits: bool = True,
    extra: int = 0,
) -> int:
    """Estimate the peak of a call over ``batch`` (a :class:`tl_reversed.core.inputs.Batch`) split into ``parts``.

    Raises :class:`WouldRunOutOfMemory` where it exceeds the memory available on the
    model's device (its devices together, for a split model); returns the estimate in bytes otherwise.
    """
    shapes = Shapes.of(model)
    chunk = max(len(p) for p in parts)
    width = int(batch.tokens.shape[1])  # type: ignore[attr-defined]
    longest_target = max((int(t.numel()) for t in batch.targets), default=1)  # type: ignore[attr-defined]
    estimate = estimate_peak(
        shapes,
        batch=chunk,
        tokens=width,
        rows=len(batch.tokens),  # type: ignore[attr-defined]
        keep=keep,
        kept_layers=kept_layers,
        full_logits=full_logits,
        target_tokens=chunk * max(longest_target, 1),
        extra=extra,
    )
    way_out = f"use a smaller batch_size (now {chunk} rows per pass) or shorter prompts (now {width} tokens)"
    if keep == "maps":
        maps = 4 * len(batch.tokens) * (kept_layers or shapes.n_layers) * shapes.n_heads * width**2 * 4  # type: ignore[attr-defined]
        way_out = f'use keep="norms" (the kept maps alone take {_gib(maps)}), or ' + way_out[4:]
    devices = model_devices(model)  # several where the model is split
    check_memory(estimate, devices if len(devices) > 1 else devices[0], what=what, way_out=way_out)
    return estimate
