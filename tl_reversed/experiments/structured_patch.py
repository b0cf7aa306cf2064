"""Length-independent attention patches: RA averaged on the prompt's template structure.

The paper's patch (:func:`~tl_reversed.experiments.patch_hooks.average_maps`) is a map
over absolute positions, so it needs training and test prompts of one token length.
A :class:`StructuredPatch` is the same average expressed on the prompt *template*:

* **Segments.** A prompt is cut into its template segments
  (:func:`tl_reversed.experiments.tasks.prompt_segments`: ``bos``, each demonstration's
  ``Q:``/input/``A:``/answer/separator, the query's ``Q:``/input/``A:``; relation
  prompts likewise), and each token is assigned to the segment holding its first
  character (:func:`token_segments`, checked against the model's token strings, or
  against its decoded tokens where a character is split over tokens).
* **Cells.** A token's coordinate, its *cell*, is ``"segment@offset"``: its segment and
  its offset from the segment's start. Fixed template text (``Q:``, ``\\nA:``, the
  final ``A:`` whose last token reads the answer) has the same cells in every prompt,
  so the last rows are addressed by their distance from the end; a variable segment
  (an input or answer word) keeps its tokens' relative positions from its start.
* **Averaging.** The patch is, for every pair of cells ``(query cell, key cell)``, the
  mean of the training prompts' per-prompt RA (or forward attention) over the prompts
  that contain both cells (``counts``). Training prompts may have any lengths.
* **Mapping back.** On any prompt of the template each (query token, key token) pair
  gets the mean of its cells; a cell never seen in training (an input longer than any
  training input) gets no patch. The causal mask is kept (no query attends ahead).

This is the simplest representation that keeps every position when the prompts share
one segmentation: each cell is then one position and every pair is seen by every
prompt, so the structured patch of such prompts equals the same-length patch exactly
(0-shot ICL prompts of one token length always share one segmentation, since only the
query input varies). The patch is added at ``hook_z`` as
``z += einsum(lr * delta_row, V)`` with each row of a (right-padded, mixed-length)
batch getting its own ``delta_row``, exactly like
:func:`~tl_reversed.experiments.patch_hooks.patch_hooks` for one length.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import einops
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_reversed.core.architecture import Model, ModelSpec, attn_hook, describe, repeat_kv
from tl_reversed.core.checks import finite_float, optional_batch_size
from tl_reversed.core.engine import Chunk, Hook, model_device, run
from tl_reversed.core.inputs import Batch
from tl_reversed.core.options import SOURCES, Source, check_option
from tl_reversed.core.reversed_attention import RASink
from tl_reversed.core.results import Result
from tl_reversed.experiments.evaluation import Answers, correct, prompt_batch
from tl_reversed.experiments.patch_hooks import first_token_loss, head_mask, head_norm_frame, stash_v
from tl_reversed.experiments.tasks import Segment, prompt_segments

PAPER_LR_BY_SOURCE = {"ra": -30.0, "fa": 1.0}
"""The paper's untuned factors (as ``attention_patching.PAPER_LR``)."""

__all__ = ["StructuredPatch", "sparse_patching", "structured_accuracy", "structured_maps", "token_segments"]


def token_segments(model: Model, prompt: str, template: str | None = None) -> list[Segment]:
    """The template segments of ``prompt`` as token spans ``(name, start, end)`` of ``model.to_tokens(prompt)``.

    The model's BOS (if it prepends one) is the segment ``"bos"``; every other token
    belongs to the segment holding its first character (see
    :func:`tl_reversed.experiments.tasks.prompt_segments`). Segments without a token of
    their own are left out. Where a character is split over several tokens (byte-level
    tokenizers split "œ" in two), its tokens all start at that character.
    """
    bos, starts = _token_starts(model, prompt)
    chars = prompt_segments(prompt, template)
    spans: list[Segment] = [("bos", 0, 1)] if bos else []
    for i, pos in enumerate(starts, start=bos):
        name = next(n for n, a, b in chars if a <= pos < b)
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], i + 1)
        else:
            spans.append((name, i, i + 1))
    return spans


def _token_starts(model: Model, prompt: str) -> tuple[int, list[int]]:
    """Whether ``model.to_tokens(prompt)`` starts with a BOS (0 or 1), and each later token's first character in ``prompt``.

    The token strings spell the prompt for most prompts; where they do not (a character
    split over tokens decodes to a replacement character in each part), token ``i``
    starts at the length of the longest prefix of ``prompt`` that the tokens before it
    decode to.
    """
    strings = [str(s) for s in model.to_str_tokens(prompt)]  # type: ignore[operator]
    for bos in (0, 1):
        if len(strings) > bos and "".join(strings[bos:]) == prompt:
            return bos, [len("".join(strings[bos:i])) for i in range(bos, len(strings))]
    ids = [int(t) for t in model.to_tokens(prompt)[0]]  # type: ignore[operator]
    decode = getattr(getattr(model, "tokenizer", None), "decode", None)
    for bos in (0, 1):
        if decode is not None and len(ids) > bos and decode(ids[bos:], clean_up_tokenization_spaces=False) == prompt:
            prefixes = [decode(ids[bos:i], clean_up_tokenization_spaces=False) for i in range(bos, len(ids))]
            return bos, [len(os.path.commonprefix([text, prompt])) for text in prefixes]
    raise ValueError(f"the model's tokens of {prompt!r} do not decode to the prompt, so its segments cannot be located")


def token_cells(model: Model, prompt: str, template: str | None) -> list[str]:
    """Each token's cell ``"segment@offset"``."""
    return [f"{name}@{i - a}" for name, a, b in token_segments(model, prompt, template) for i in range(a, b)]


def _prompts(examples: object) -> list[str]:
    if isinstance(examples, str):
        return [examples]
    if isinstance(examples, tuple) and len(examples) == 2 and not hasattr(examples[0], "prompt") and not isinstance(examples[0], str):
        return list(examples[0])  # (prompts, targets)
    return [item if isinstance(item, str) else item.prompt for item in examples]  # type: ignore[attr-defined]


@dataclass
class StructuredPatch(Result):
    """An attention patch on the template structure, for prompts of any length (see the module docstring).

    Attributes:
        maps: ``[layer, head, query_cell, key_cell]`` mean RA (or forward attention) per cell pair.
        counts: ``[query_cell, key_cell]`` number of training prompts holding both cells.
        cells: the cell names ``"segment@offset"``, in the order of the maps' axes.
        source: ``"ra"`` or ``"fa"``.
        lr: the factor the hooks use unless given one (default: the paper's, -30 for RA).
        template: the relation template of the prompts (``None``: the ICL format).
        n_examples: training prompts averaged; lengths: their token lengths.
        loss: mean training loss of the first target token.
    """

    maps: Float[Tensor, "layer head cell cell"]
    counts: Float[Tensor, "cell cell"]
    cells: list[str]
    source: str
    lr: float
    template: str | None
    n_examples: int
    lengths: list[int]
    loss: float
    seconds: float = 0.0

    def norms(self) -> Float[Tensor, "layer head"]:
        """Frobenius norm of each head's map (the ranking of ``top_k``)."""
        return self.maps.flatten(-2).norm(dim=-1)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per head: layer, head and the norm of its map."""
        return head_norm_frame(self.norms(), self.source)

    def check_model(self, spec: ModelSpec) -> None:
        if tuple(self.maps.shape[:2]) != (spec.n_layers, spec.n_heads):
            raise ValueError(
                f"this patch was made for a model with {self.maps.shape[0]} layers and {self.maps.shape[1]} heads, "
                f"but the model has {spec.n_layers} layers and {spec.n_heads} heads: make the patch with this model "
                "(structured_maps(model, train))"
            )

    def cell_ids(self, model: Model, prompts: Sequence[str]) -> list[Int[Tensor, " pos"]]:
        """For each prompt, each token's index into :attr:`cells` (``-1``: a cell not seen in training)."""
        index = {cell: i for i, cell in enumerate(self.cells)}
        return [torch.tensor([index.get(c, -1) for c in token_cells(model, p, self.template)]) for p in prompts]

    def deltas(self, ids: Sequence[Tensor], width: int, lr: float, mask: Tensor | None = None) -> Float[Tensor, "batch layer head pos pos"]:
        """``lr * patch`` on rows of cell ids, right-padded to ``width`` (zero on pads, unseen cells and ahead of the query)."""
        n = len(self.cells)
        rows = torch.full((len(ids), width), n, dtype=torch.long)
        for r, row in enumerate(ids):
            rows[r, : len(row)] = torch.where(row < 0, n, row)
        padded = torch.nn.functional.pad(self.maps.float(), (0, 1, 0, 1))
        delta = padded[:, :, rows[:, :, None], rows[:, None, :]]  # layer head batch q k
        delta = einops.rearrange(delta, "layer head batch q k -> batch layer head q k").tril()
        if mask is not None:
            delta = delta * mask[None, :, :, None, None].to(delta.dtype)
        return lr * delta

    def dense(self, model: Model, prompt: str, lr: float = 1.0) -> Float[Tensor, "layer head pos pos"]:
        """The patch mapped onto one prompt: ``[layer, head, pos, pos]`` (times ``lr``)."""
        self.check_model(describe(model))
        ids = self.cell_ids(model, [prompt])
        return self.deltas(ids, len(ids[0]), lr)[0]

    def hooks(self, model: Model, batch: object, *, lr: float | None = None, heads: object = None,
              top_k: float | None = None) -> list[Hook]:  # fmt: skip
        """Forward hooks patching ``batch`` (prompt strings or examples, in the order the model reads them).

        The model must read exactly these prompts, right-padded (``model.to_tokens(prompts)``
        pads on the right); each row gets its own patch. ``lr``: default :attr:`lr`;
        ``heads`` (``[(layer, head), ...]``) or ``top_k`` (a fraction in (0, 1] or a number
        of heads, by :meth:`norms`) patch only those heads.
        """
        spec = describe(model)
        self.check_model(spec)
        ids = self.cell_ids(model, _prompts(batch))
        mask = head_mask(self.norms(), heads, top_k)
        lr = self.lr if lr is None else finite_float(lr, "lr")
        delta = self.deltas(ids, max(len(i) for i in ids), lr, mask).to(model_device(model))
        return row_hooks(spec, delta)


def row_hooks(spec: ModelSpec, delta: Float[Tensor, "batch layer head pos pos"]) -> list[Hook]:
    """``z += einsum(delta[row, layer], V[row])`` at every layer's ``hook_z``, one delta per row."""
    hooks: list[Hook] = []
    for layer in range(spec.n_layers):
        stash: dict[str, Tensor] = {}
        hooks.append((attn_hook(layer, "v"), stash_v(stash)))
        hooks.append((attn_hook(layer, "z"), _add_rows(delta[:, layer], stash, spec.n_heads)))
    return hooks


def _add_rows(delta: Float[Tensor, "batch head pos pos"], stash: dict[str, Tensor], n_heads: int):
    def hook(z: Float[Tensor, "batch query_pos head d_head"], hook: object) -> Tensor:
        v = stash.pop("v", None)
        if v is None:
            raise RuntimeError("hook_v did not fire before hook_z in this layer: the patch at hook_z cannot see the values")
        if z.shape[0] != delta.shape[0] or z.shape[1] < delta.shape[-1]:
            raise ValueError(
                f"the structured patch was laid out for {delta.shape[0]} prompts of up to {delta.shape[-1]} tokens, "
                f"but the model reads {z.shape[0]} rows of {z.shape[1]}: build the hooks with the prompts the model reads"
            )
        width = z.shape[1]
        d = torch.nn.functional.pad(delta, (0, width - delta.shape[-1], 0, width - delta.shape[-1]))
        values = repeat_kv(v, n_heads)
        shift = einops.einsum(d.to(values.device, values.dtype), values, "batch head q k, batch k head d -> batch q head d")
        return z + shift.to(z.dtype)

    return hook


class _CellMaps:
    """Pass-engine sink: each prompt's RA (or forward) maps, summed into (query cell, key cell) pairs."""

    def __init__(self, model: Model, spec: ModelSpec, source: str, ids: list[Tensor], n_cells: int):
        self.model, self.spec, self.source, self.ids = model, spec, source, ids
        self.total = torch.zeros(spec.n_layers, spec.n_heads, n_cells, n_cells, dtype=torch.float64)
        self.counts = torch.zeros(n_cells, n_cells, dtype=torch.float64)
        self.loss = 0.0
        self._ra: RASink | None = None

    def metric(self, logits: Tensor, tokens: Tensor) -> Tensor:
        assert self._ra is not None
        return first_token_loss(self._ra.batch, logits)

    def hooks(self, chunk: Chunk) -> tuple[list[Hook], list[Hook]]:
        self._ra = RASink(self.model, self.spec, list(range(self.spec.n_layers)), chunk.batch, "maps")
        return self._ra.hooks(chunk)

    def merge(self, chunk: Chunk) -> None:
        assert self._ra is not None and chunk.loss is not None
        ra = self._ra
        ra.merge(Chunk(torch.arange(len(chunk.batch)), chunk.batch, chunk.loss))
        maps = ra.maps if self.source == "ra" else ra.pattern
        assert maps is not None
        for r, row in enumerate(chunk.index.tolist()):
            c = self.ids[row]
            n = len(c)
            self.total[:, :, c[:, None], c[None, :]] += maps[r, :, :, :n, :n].double()
            self.counts[c[:, None], c[None, :]] += 1
        self.loss += float(ra.loss.sum())
        self._ra = None


def structured_maps(
    model: Model,
    train: object,
    source: Source = "ra",
    *,
    lr: float | None = None,
    template: str | None = None,
    under: StructuredPatch | None = None,
    batch_size: int | None = 16,
    progress: bool | None = None,
) -> StructuredPatch:
    """Average RA maps (or forward attention) of training prompts of any lengths on their template cells.

    Args:
        model: a TransformerBridge (compatibility mode) or HookedTransformer.
        train: examples (``ExampleSet``, list of ``Example`` or ``(prompts, targets)``) of one template.
        source: ``"ra"`` or ``"fa"``.
        lr: the patch's default factor (default: the paper's, -30 for RA, +1 for forward attention).
        template: the relation template of the prompts (``None``: the ICL format).
        under: compute the maps with this patch applied (at its own ``lr``), as a step of
            iterative patching does: RA is then the gradient of the patched model.
        batch_size, progress: as for :func:`~tl_reversed.experiments.patch_hooks.average_maps`.
    """
    check_option("source", source, SOURCES)
    optional_batch_size(batch_size)
    start = time.perf_counter()
    spec = describe(model)
    batch = prompt_batch(model, train, spec)
    assert batch.prompts is not None
    per_prompt = [token_cells(model, p, template) for p in batch.prompts]
    for p, cells, length in zip(batch.prompts, per_prompt, batch.lengths.tolist()):
        if len(cells) != length:
            raise ValueError(f"prompt {p!r} has {length} tokens in the batch but {len(cells)} token strings")
    cells = list(dict.fromkeys(c for row in per_prompt for c in row))
    index = {c: i for i, c in enumerate(cells)}
    ids = [torch.tensor([index[c] for c in row]) for row in per_prompt]
    sink = _CellMaps(model, spec, source, ids, len(cells))
    sinks: list = [sink]
    if under is not None:
        under.check_model(spec)
        sinks.insert(0, _RowPatch(under, spec, under.cell_ids(model, batch.prompts), under.lr, None, model_device(model)))
    run(model, batch, sinks, metric=sink.metric, batch_size=batch_size, progress=progress, desc=f"structured {source.upper()}")
    maps = (sink.total / sink.counts.clamp(min=1)).float()
    return StructuredPatch(
        maps=maps, counts=sink.counts.float(), cells=cells, source=source,
        lr=PAPER_LR_BY_SOURCE[source] if lr is None else finite_float(lr, "lr"), template=template,
        n_examples=len(batch), lengths=batch.lengths.tolist(), loss=sink.loss / len(batch),
        seconds=time.perf_counter() - start,
    )  # fmt: skip


class _RowPatch:
    """Pass-engine sink that adds a structured patch to each chunk's own rows (no result)."""

    def __init__(self, patch: StructuredPatch, spec: ModelSpec, ids: list[Tensor], lr: float, mask: Tensor | None, device):
        self.patch, self.spec, self.ids, self.lr, self.mask, self.device = patch, spec, ids, lr, mask, device

    def hooks(self, chunk: Chunk) -> tuple[list[Hook], list[Hook]]:
        rows = [self.ids[i] for i in chunk.index.tolist()]
        delta = self.patch.deltas(rows, chunk.batch.tokens.shape[1], self.lr, self.mask).to(self.device)
        return row_hooks(self.spec, delta), []

    def merge(self, chunk: Chunk) -> None:
        pass

    def finish(self) -> None:
        return None


def structured_accuracy(
    model: Model,
    patch: StructuredPatch | None,
    test: object,
    *,
    lr: float | None = None,
    heads: object = None,
    top_k: float | None = None,
    batch_size: int | None = 16,
) -> Float[Tensor, " batch"]:
    """Per test prompt (any lengths), whether the top-1 token is its first target token under ``patch`` (None: unpatched)."""
    spec = describe(model)
    batch: Batch = prompt_batch(model, test, spec)
    answers = Answers(len(batch))
    sinks: list = [answers]
    if patch is not None:
        patch.check_model(spec)
        assert batch.prompts is not None
        mask = head_mask(patch.norms(), heads, top_k)
        factor = patch.lr if lr is None else finite_float(lr, "lr")
        sinks.insert(0, _RowPatch(patch, spec, patch.cell_ids(model, batch.prompts), factor, mask, model_device(model)))
    run(model, batch, sinks, backward=False, batch_size=batch_size, progress=False, desc="forward")
    return correct(answers.finish(), batch).float()


@dataclass
class SparsePatching(Result):
    """Test accuracy when only the top ``k`` heads (by the patch's norms) are patched."""

    fractions: list[float]
    n_heads: list[int]
    accuracy: list[float]
    original: float
    lr: float
    n_test: int
    patch: StructuredPatch | None = field(default=None, repr=False)

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame({"fraction": self.fractions, "n_heads": self.n_heads, "accuracy": self.accuracy}).assign(
            original=self.original, lr=self.lr
        )

    def plot(self, ax=None, **kwargs):
        """Test accuracy against the number of patched heads (log scale), the unpatched model dashed; returns the Figure."""
        from tl_reversed.views.plotting import figure_and_axes

        fig, ax = figure_and_axes(ax, (5, 3.5))
        ax.plot(self.n_heads, self.accuracy, marker="o", label=f"top heads patched, lr {self.lr:g}", **kwargs)
        for n, k, acc in zip(self.n_heads, self.fractions, self.accuracy):
            ax.annotate(f"{k:.0%}", (n, acc), textcoords="offset points", xytext=(0, 6), ha="center", fontsize="small")
        ax.axhline(self.original, color="grey", linestyle="--", label="unpatched")
        ax.set_xscale("log")
        ax.set_xlabel("heads patched (top by patch norm)")
        ax.set_ylabel("top-1 accuracy, every test length")
        ax.set_ylim(-0.02, 1.08)
        ax.legend(fontsize="small")
        return fig


def sparse_patching(
    model: Model,
    patch: StructuredPatch,
    test: object,
    fractions: Sequence[float] = (0.01, 0.05, 0.10, 0.25, 1.0),
    *,
    lr: float | None = None,
    batch_size: int | None = 16,
) -> SparsePatching:
    """Accuracy against ``k``: patch only the top ``k`` heads by RA norm, for each fraction ``k``."""
    accs, counts = [], []
    for k in fractions:
        counts.append(int(head_mask(patch.norms(), None, float(k)).sum()))  # type: ignore[union-attr]
        accs.append(float(structured_accuracy(model, patch, test, lr=lr, top_k=float(k), batch_size=batch_size).mean()))
    original = float(structured_accuracy(model, None, test, batch_size=batch_size).mean())
    return SparsePatching([float(k) for k in fractions], counts, accs, original,
                          patch.lr if lr is None else float(lr), len(_prompts(test)), patch)  # fmt: skip


@contextmanager
def structured_patch(model: Model, patch: StructuredPatch, prompts: object, **kwargs: object) -> Iterator[Model]:
    """Context manager: the model patched for these ``prompts`` (see :meth:`StructuredPatch.hooks`)."""
    with model.hooks(fwd_hooks=patch.hooks(model, prompts, **kwargs)):  # type: ignore[operator]
        yield model
