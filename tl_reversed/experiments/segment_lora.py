"""LoRA fine-tuning under segment masks (MAS: Katz, Ringel, Romano & Wolf, ACL 2025), and its baseline.

MAS relaxes the causal mask during prefill: every prompt token attends to all tokens of
its own segment and of the earlier segments (:func:`tl_reversed.core.segments.prefill_mask`);
the answer tokens after the prompt stay causal. A model was pretrained causally, so MAS
pairs the mask with a light fine-tuning. The recipe here:

* prompts with a natural segment structure, ``[instruction, query]``, then the answer::

      <bos>Choose the middle word of the three.\\n | Q: yacht, umbrella, easel\\nA: | " umbrella"
      segment 0                                    segment 1                          causal

* LoRA (``peft``) on the attention projections (query, key, value, output) of a plain
  Hugging Face copy of the model (:func:`tl_reversed.core.hf_copy.hf_copy`; the bridge
  is never trained and is left as found), the loss being the cross-entropy of the answer
  tokens, with the segment mask (``mask="segments"``, MAS-LoRA) or the causal mask
  (``mask="causal"``, the baseline: the same steps, seed, data and batches);
* held-out accuracy: the first answer token is the top-1 prediction at the last prompt
  token, under the mask the model was trained with (base model: under both).

The mask reaches the computation as a 4-D float attention mask of the Hugging Face
model (``transformers`` passes it through unchanged; ``hf_copy`` checks on every copy
that the 4-D causal mask gives the model's own logits). Adapters save with peft's
``save_pretrained`` into a folder (plus ``run.safetensors``: the losses and settings) and
load back onto a fresh copy of the same model (:meth:`SegmentLoRA.load`). They are
adapters of the bridge's processed weights (compatibility mode folds the norms into the
projections), so they load onto a model loaded the same way, not onto the raw checkpoint.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_reversed.core.hf_copy import additive_mask, attention_projections, fingerprint, hf_copy, masked_logits
from tl_reversed.core.results import Result
from tl_reversed.core.segments import PAD_ID, prefill_mask, tokenize_pieces
from tl_reversed.experiments.task_data import load_task, train_test_split

Mask = Literal["segments", "causal"]
MASKS: tuple[Mask, ...] = ("segments", "causal")

INSTRUCTIONS: dict[str, str] = {
    "choose_middle_of_3": "Choose the middle word of the three.",
    "alphabetically_first_3": "Choose the word that comes first in alphabetical order.",
    "animal_v_object_3": "Choose the word that names an animal.",
    "adjective_v_verb_3": "Choose the word that is an adjective.",
    "present-past": "Give the past tense of the verb.",
    "singular-plural": "Give the plural of the noun.",
}
"""The instruction segment of each task of the experiment (the query segment is ``"Q: {x}\\nA:"``)."""


@dataclass(frozen=True)
class SegmentExample:
    """One prompt as segments (``pieces``: instruction, query) and its answer (``target``, with its leading space)."""

    pieces: tuple[str, ...]
    target: str


def segment_examples(
    task: str, split: Literal["train", "test"] = "train", n: int | None = None, seed: int = 0, instruction: str | None = None
) -> list[SegmentExample]:
    """The task's pairs of one split (:func:`~tl_reversed.experiments.task_data.train_test_split`) as segmented prompts.

    ``instruction`` defaults to :data:`INSTRUCTIONS`; a task without one needs it given.
    """
    name = load_task(task).name
    if instruction is None:
        if name not in INSTRUCTIONS:
            raise ValueError(f"no instruction for task {name!r}: pass instruction='...' (known: {', '.join(INSTRUCTIONS)})")
        instruction = INSTRUCTIONS[name]
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    pairs = train_test_split(name, seed)[0 if split == "train" else 1]
    pairs = pairs if n is None else pairs[:n]
    return [SegmentExample((f"{instruction}\n", f"Q: {x}\nA:"), f" {y}") for x, y in pairs]


def check_mask(mask: str) -> Mask:
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    return mask  # type: ignore[return-value]


@dataclass
class Encoded:
    """Right-padded prompt + answer tokens, the allowed-attention mask, and where the answer is."""

    tokens: Int[Tensor, "batch pos"]
    allowed: Bool[Tensor, "batch query key"]
    prompt_len: Int[Tensor, " batch"]
    total_len: Int[Tensor, " batch"]


def encode(model, examples: Sequence[SegmentExample], mask: Mask, with_target: bool = True) -> Encoded:
    """Tokens of ``examples`` (prompt pieces, then the answer when ``with_target``) and their mask.

    ``mask="segments"``: :func:`~tl_reversed.core.segments.prefill_mask` of the pieces, the
    answer causal; ``"causal"``: every token its own segment (the causal mask).
    """
    check_mask(mask)
    rows = []
    for example in examples:
        tokens, ids = tokenize_pieces(model, example.pieces)
        if mask == "causal":
            ids = torch.arange(len(ids), device=ids.device)
        target = model.to_tokens(example.target, prepend_bos=False)[0].to(tokens.device) if with_target else tokens[:0]
        rows.append((torch.cat([tokens, target]), ids))
    width = max(len(t) for t, _ in rows)
    pad = getattr(model.tokenizer, "pad_token_id", None) or 0
    tokens = torch.full((len(rows), width), int(pad), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding rows see only themselves
    for i, (t, ids) in enumerate(rows):
        tokens[i, : len(t)] = t
        allowed[i, : len(t), : len(t)] = prefill_mask(ids[None].cpu(), total_len=len(t))[0]
    return Encoded(
        tokens,
        allowed,
        torch.tensor([len(ids) for _, ids in rows]),
        torch.tensor([len(t) for t, _ in rows]),
    )


def logits_at(hf_model, batch: Encoded, rows: Int[Tensor, " n"], cols: Int[Tensor, " n"]) -> Float[Tensor, "n vocab"]:
    """Logits at positions ``(rows[i], cols[i])`` under ``batch.allowed``: the unembedding runs only there."""
    first = next(hf_model.parameters())
    device, dtype = first.device, first.dtype
    body = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    hidden = body.base_model(input_ids=batch.tokens.to(device), attention_mask=additive_mask(batch.allowed.to(device), dtype))
    return body.get_output_embeddings()(hidden.last_hidden_state[rows.to(device), cols.to(device)])


def answer_loss(hf_model, batch: Encoded) -> Float[Tensor, ""]:
    """Mean cross-entropy of the answer tokens (teacher forcing), under ``batch.allowed``."""
    rows, cols = [], []
    for i, (p, t) in enumerate(zip(batch.prompt_len.tolist(), batch.total_len.tolist())):
        rows += [i] * (t - p)
        cols += list(range(p - 1, t - 1))
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    logits = logits_at(hf_model, batch, rows_t, cols_t)
    return torch.nn.functional.cross_entropy(logits.float(), batch.tokens[rows_t, cols_t + 1].to(logits.device))


@dataclass
class LoRARun(Result):
    """The record of one LoRA training run: per-step losses, wall time and every setting."""

    task: str | None
    mask: str
    losses: Float[Tensor, " step"]
    seconds: float
    settings: dict

    def to_dataframe(self) -> pd.DataFrame:
        """One row per step: ``task, mask, step, loss``."""
        return pd.DataFrame(
            {"task": self.task, "mask": self.mask, "step": range(1, len(self.losses) + 1), "loss": self.losses.tolist()}
        )

    def plot(self, ax=None):
        """The training loss against the step."""
        from tl_reversed.views.segment_lora import plot_losses

        return plot_losses([self], ax=ax)


class SegmentLoRA:
    """A LoRA-adapted Hugging Face copy of a model (``hf_model``, a peft model) and its training record (``run``)."""

    def __init__(self, hf_model, run: LoRARun):
        self.hf_model = hf_model
        self.run = run

    @property
    def mask(self) -> Mask:
        return self.run.mask  # type: ignore[return-value]

    def logits(self, tokens: Int[Tensor, "batch pos"], allowed: Bool[Tensor, "batch query key"]) -> Float[Tensor, "batch pos vocab"]:
        """Logits of the adapted model under the mask ``allowed`` (True = may attend)."""
        with torch.no_grad():
            return masked_logits(self.hf_model, tokens.to(next(self.hf_model.parameters()).device), allowed)

    def save(self, folder: str | Path) -> Path:
        """The adapter (peft ``save_pretrained``) and ``run.safetensors`` into ``folder``."""
        folder = Path(folder)
        self.hf_model.save_pretrained(folder)
        self.run.save(folder / "run.safetensors")
        return folder

    @classmethod
    def load(cls, model, folder: str | Path) -> SegmentLoRA:
        """The adapter saved in ``folder``, on a fresh copy of ``model`` (the model it was trained from)."""
        require_peft()
        from peft import PeftModel

        folder = Path(folder)
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{folder} holds no adapter (adapter_config.json): train one with train_segment_lora(...).save(folder)")
        run = LoRARun.load(folder / "run.safetensors")
        base = hf_copy(model)
        expected = run.settings.get("base_logits")
        if expected is not None and not torch.allclose(torch.tensor(fingerprint(base)), torch.tensor(expected), rtol=1e-4, atol=1e-4):
            raise ValueError(
                f"the adapter in {folder} was trained on another model (or one loaded differently): its base logits "
                "differ from this model's; load it onto the model it was trained from"
            )
        with _quiet_peft():
            hf_model = PeftModel.from_pretrained(base, folder).eval()
        hf_model.requires_grad_(False)
        return cls(hf_model, run)

    def to_dataframe(self) -> pd.DataFrame:
        return self.run.to_dataframe()

    def plot(self, ax=None):
        return self.run.plot(ax=ax)


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of example indices: shuffled epochs, one private generator per seed."""
    rng, order, out = random.Random(seed), [], []
    for _ in range(steps):
        if len(order) < batch_size:
            epoch = list(range(n))
            rng.shuffle(epoch)
            order += epoch
        out.append(order[:batch_size])
        del order[:batch_size]
    return out


def require_peft() -> None:
    """Raise a clear ``ImportError`` where ``peft`` (the ``segments`` extra) is not installed."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError('LoRA under segment masks needs peft: pip install "tl_reversed[segments]"') from None


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """Silence, for this block only, the deprecation warning peft 0.21 triggers in transformers 5."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def add_lora(hf_model, *, rank: int = 8, alpha: float = 16.0, seed: int = 0, targets: Sequence[str] | None = None):
    """``hf_model`` (a :func:`~tl_reversed.core.hf_copy.hf_copy`) wrapped by peft with fresh LoRA adapters.

    peft's default initialisation: ``A`` random (seeded here, the global generator untouched),
    ``B`` zero, so the adapted model starts exactly at the base model.
    """
    require_peft()
    from peft import LoraConfig, get_peft_model

    targets = tuple(targets) if targets is not None else attention_projections(hf_model)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none")
    with torch.random.fork_rng(devices=[]), _quiet_peft():  # peft initialises on the CPU, then moves
        torch.random.default_generator.manual_seed(seed)  # not torch.manual_seed: it reseeds every CUDA device too
        try:
            return get_peft_model(hf_model, config)
        except ValueError as error:
            raise ValueError(f"LoRA targets {list(targets)} do not fit {type(hf_model).__name__} ({error}): pass targets=[...] "
                             "with its attention projection names") from None  # fmt: skip


def train_segment_lora(
    model,
    examples: Sequence[SegmentExample],
    mask: Mask = "segments",
    *,
    steps: int = 100,
    batch_size: int = 8,
    lr: float = 1e-3,
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    targets: Sequence[str] | None = None,
    task: str | None = None,
    progress: bool = True,
) -> SegmentLoRA:
    """Train a LoRA adapter on the answer loss of ``examples`` under ``mask``; the model is left as found.

    Args:
        model: a TransformerBridge; training runs on a copy (:func:`~tl_reversed.core.hf_copy.hf_copy`).
        examples: training prompts (:func:`segment_examples`).
        mask: ``"segments"`` (MAS) or ``"causal"`` (the baseline).
        steps, batch_size, lr: AdamW steps over shuffled epochs of ``examples``.
        rank, alpha: LoRA rank and scaling (``alpha / rank``); no dropout, so runs are deterministic.
        seed: the LoRA initialisation and the batch order (the same for both masks).
        targets: module names to adapt (default: the attention projections of the architecture).
        task: a name recorded in the run.

    Returns:
        :class:`SegmentLoRA`: the adapted copy (eval mode, frozen) and its :class:`LoRARun`.
    """
    from tqdm.auto import tqdm

    require_peft()
    mask = check_mask(mask)
    if steps < 1 or batch_size < 1 or not examples:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and examples; got {steps}, {batch_size}, {len(examples)} examples")
    base = hf_copy(model)
    base_logits = fingerprint(base)
    targets = tuple(targets) if targets is not None else attention_projections(base)
    adapted = add_lora(base, rank=rank, alpha=alpha, seed=seed, targets=targets)
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = encode(model, examples, mask)
    losses = []
    start = time.perf_counter()
    adapted.train()
    for indices in tqdm(_batches(len(examples), batch_size, steps, seed), desc=f"LoRA ({mask} mask)", disable=not progress):
        batch = _subset(data, indices)
        loss = answer_loss(adapted, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    adapted.eval().requires_grad_(False)
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, rank=rank, alpha=alpha, seed=seed, targets=targets,
                    n_train=len(examples), base_logits=base_logits)  # fmt: skip
    run = LoRARun(task, mask, torch.tensor(losses), time.perf_counter() - start, settings)
    return SegmentLoRA(adapted, run)


def _subset(data: Encoded, indices: list[int]) -> Encoded:
    """Rows ``indices`` of ``data``, trimmed to their longest sequence."""
    index = torch.tensor(indices)
    width = int(data.total_len[index].max())
    return Encoded(data.tokens[index, :width], data.allowed[index, :width, :width], data.prompt_len[index], data.total_len[index])


def segment_accuracy(
    model, examples: Sequence[SegmentExample], mask: Mask, *, adapted=None, batch_size: int = 16
) -> Bool[Tensor, " example"]:
    """Whether the top-1 prediction at the last prompt token is the answer's first token, per example.

    Runs ``adapted`` (a :class:`SegmentLoRA` of ``model``, or a Hugging Face copy from
    :func:`~tl_reversed.core.hf_copy.hf_copy`) if given, else a copy of ``model`` itself,
    under ``mask``. Prompts only (the answer is not fed), in batches.
    """
    mask = check_mask(mask)
    if adapted is None:
        adapted = hf_copy(model)
    hf_model = adapted.hf_model if isinstance(adapted, SegmentLoRA) else adapted
    correct = []
    for begin in range(0, len(examples), batch_size):
        chunk = examples[begin : begin + batch_size]
        data = encode(model, chunk, mask, with_target=False)
        first = torch.stack([model.to_tokens(e.target, prepend_bos=False)[0, 0] for e in chunk]).cpu()
        with torch.no_grad():
            last = logits_at(hf_model, data, torch.arange(len(chunk)), data.prompt_len - 1)
        correct.append(last.argmax(-1).cpu() == first)
    return torch.cat(correct)


def segment_generate(model, pieces: Sequence[str], max_new_tokens: int = 8, *, adapted=None, mask: Mask | None = None) -> str:
    """Greedy continuation of a prompt given as pieces: prefill under the segment mask, then causal.

    Runs ``adapted`` (a :class:`SegmentLoRA`, under its own mask unless ``mask`` is given) or a
    copy of ``model`` (``mask`` default ``"segments"``). Every step recomputes the whole
    sequence under :func:`~tl_reversed.core.segments.prefill_mask` (no key-value cache: meant
    for short answers). Returns the generated text.
    """
    mask = check_mask(mask or (adapted.mask if isinstance(adapted, SegmentLoRA) else "segments"))
    hf_model = adapted.hf_model if isinstance(adapted, SegmentLoRA) else (adapted if adapted is not None else hf_copy(model))
    tokens, ids = tokenize_pieces(model, pieces)
    if mask == "causal":
        ids = torch.arange(len(ids), device=ids.device)
    device = next(hf_model.parameters()).device
    tokens, ids = tokens.to(device), ids.cpu()
    eos = getattr(model.tokenizer, "eos_token_id", None)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = masked_logits(hf_model, tokens[None], prefill_mask(ids[None], total_len=len(tokens)))
        token = logits[0, -1].argmax()
        tokens = torch.cat([tokens, token[None]])
        if eos is not None and int(token) == eos:
            break
    return model.tokenizer.decode(tokens[len(ids) :].tolist())


@dataclass
class SegmentLoRAComparison(Result):
    """Held-out accuracy of the base model, causal-LoRA and MAS-LoRA on one task.

    ``correct[c, i]``: condition ``conditions[c]`` (``"model / mask"``) got test example ``i`` right.
    """

    task: str
    conditions: tuple[str, ...]
    correct: Bool[Tensor, "condition example"]
    n_train: int
    train_seconds: dict
    final_loss: dict
    settings: dict

    def accuracy(self) -> dict[str, float]:
        return {c: float(row.float().mean()) for c, row in zip(self.conditions, self.correct)}

    def paired(self, a: str = "MAS-LoRA / segments", b: str = "causal-LoRA / causal") -> tuple[int, int]:
        """On the same test examples: how many only ``a`` gets right, and how many only ``b``."""
        right_a, right_b = (self.correct[self.conditions.index(c)] for c in (a, b))
        return int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())

    def to_dataframe(self) -> pd.DataFrame:
        """One row per condition: ``task, model, mask, accuracy, n_test, n_train, train_seconds, final_loss``."""
        rows = []
        for condition, row in zip(self.conditions, self.correct):
            name, mask = condition.split(" / ")
            rows.append(dict(task=self.task, model=name, mask=mask, accuracy=float(row.float().mean()), n_test=row.numel(),
                             n_train=self.n_train, train_seconds=self.train_seconds.get(name), final_loss=self.final_loss.get(name)))  # fmt: skip
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """Accuracy per condition (bars)."""
        from tl_reversed.views.segment_lora import plot_accuracy

        return plot_accuracy(self.to_dataframe(), ax=ax)


BASE_CONDITIONS = (("base", "causal"), ("base", "segments"))
MATCHED = {"causal-LoRA": "causal", "MAS-LoRA": "segments"}


def evaluate_segment_lora(
    model, task: str, adapters: dict[str, SegmentLoRA], test: Sequence[SegmentExample], *, cross: bool = False, batch_size: int = 16
) -> SegmentLoRAComparison:
    """Accuracy on ``test`` of the base model (both masks) and each adapter (``{"causal-LoRA": ..., "MAS-LoRA": ...}``).

    Each adapter runs under the mask it was trained with; ``cross`` adds the other mask too.
    """
    conditions, correct = [], []
    base = hf_copy(model)
    for name, mask in BASE_CONDITIONS:
        conditions.append(f"{name} / {mask}")
        correct.append(segment_accuracy(model, test, mask, adapted=base, batch_size=batch_size))
    del base
    for name, adapter in adapters.items():
        masks = [adapter.mask] + ([m for m in MASKS if m != adapter.mask] if cross else [])
        for mask in masks:
            conditions.append(f"{name} / {mask}")
            correct.append(segment_accuracy(model, test, mask, adapted=adapter, batch_size=batch_size))
    runs = {name: a.run for name, a in adapters.items()}
    some = next(iter(runs.values()), None)
    return SegmentLoRAComparison(
        task=load_task(task).name,
        conditions=tuple(conditions),
        correct=torch.stack(correct),
        n_train=int(some.settings["n_train"]) if some else 0,
        train_seconds={n: r.seconds for n, r in runs.items()},
        final_loss={n: float(r.losses[-10:].mean()) for n, r in runs.items()},
        settings=dict(some.settings) if some else {},
    )


def compare_segment_lora(
    model, task: str, *, n_train: int | None = None, n_test: int | None = None, seed: int = 0, cross: bool = False, **train
) -> SegmentLoRAComparison:
    """Train causal-LoRA and MAS-LoRA on ``task`` (same steps, seed, data) and compare them with the base model.

    ``train`` goes to :func:`train_segment_lora` (``steps``, ``batch_size``, ``lr``, ``rank``...).
    """
    examples = segment_examples(task, "train", n=n_train, seed=seed)
    test = segment_examples(task, "test", n=n_test, seed=seed)
    adapters = {name: train_segment_lora(model, examples, mask, seed=seed, task=task, **train) for name, mask in MATCHED.items()}
    return evaluate_segment_lora(model, task, adapters, test, cross=cross)


__all__ = [
    "INSTRUCTIONS",
    "LoRARun",
    "add_lora",
    "answer_loss",
    "SegmentExample",
    "SegmentLoRA",
    "SegmentLoRAComparison",
    "compare_segment_lora",
    "encode",
    "evaluate_segment_lora",
    "segment_accuracy",
    "segment_examples",
    "segment_generate",
    "train_segment_lora",
]
