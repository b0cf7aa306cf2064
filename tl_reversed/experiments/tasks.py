"""Task data for the Reversed Attention experiments: loading, splitting, prompts.

The paper (Katz & Wolf, NAACL 2025) evaluates two kinds of tasks:

* ``"icl"``: Todd et al.'s in-context-learning pairs (``function_vectors/``).
  A prompt is ``"Q: {x}\\nA: {y}\\n\\n"`` per demonstration, then
  ``"Q: {x}\\nA:"``; see :func:`icl_prompt`.
* ``"relation"``: Hernandez et al.'s relations (``relations/``), asked as natural
  questions with the relation's cloze template, e.g.
  ``"The capital city of {} is"``; see :func:`relation_prompt`.

In both cases the target is the answer with one leading space, ``" {y}"``.

Typical use::

    from tl_reversed.experiments.tasks import make_examples, same_length_groups

    train = make_examples("capitalize", shots=5, split="train", model=model)
    for group in same_length_groups(model, train, min_size=2):
        ...  # group.length, group.prompts, group.targets

Everything is deterministic for a given ``seed``: all randomness comes from
private :class:`random.Random` instances, never from the global generator.
The data files ship inside the package (``tl_reversed/data``, MIT licensed;
``data/SOURCES.md`` names the upstream commits).

Layout: the task registry, loading and the train/test split live in
:mod:`tl_reversed.experiments.task_data` (re-exported here); this module builds
prompts (:func:`icl_prompt`, :func:`relation_prompt`), examples (:func:`make_examples`,
:func:`shuffled_labels`) and same-length groups.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, overload

import pandas as pd

from tl_reversed.core.checks import nonnegative_int
from tl_reversed.core.options import DRAWS, SPLITS, Draw, Split, check_option
from tl_reversed.experiments.task_data import (  # re-exported: tasks.<name> keeps working  # noqa: F401
    DATA_DIR,
    TASKS,
    TEST_FRACTION,
    Pair,
    Task,
    TaskInfo,
    TaskKind,
    as_task,
    list_tasks,
    load_task,
    normalise_task_name,
    train_test_split,
)

__all__ = [
    "DATA_DIR",
    "TASKS",
    "Example",
    "ExampleSet",
    "Task",
    "TaskInfo",
    "icl_prompt",
    "list_tasks",
    "load_task",
    "make_examples",
    "normalise_task_name",
    "prompt_segments",
    "relation_prompt",
    "same_length_groups",
    "shuffled_labels",
    "train_test_split",
]

# --------------------------------------------------------------------------
# Prompt formats
# --------------------------------------------------------------------------


def icl_prompt(demos: Iterable[Pair], query_x: str) -> str:
    """Todd et al.'s ICL prompt: ``"Q: {x}\\nA: {y}\\n\\n"`` per demo, then the query.

    >>> icl_prompt([("hot", "cold")], "up")
    'Q: hot\\nA: cold\\n\\nQ: up\\nA:'
    """
    return "".join(f"Q: {x}\nA: {y}\n\n" for x, y in demos) + f"Q: {query_x}\nA:"


def relation_prompt(template: str, x: str, demos: Iterable[Pair] = ()) -> str:
    """Natural-question prompt in Hernandez et al.'s few-shot format.

    Each demonstration is the filled template followed by a space and its
    answer, one per line; the last line is the filled template for ``x``
    (no trailing space: the target carries it).

    >>> relation_prompt("The capital city of {} is", "France", [("Spain", "Madrid")])
    'The capital city of Spain is Madrid\\nThe capital city of France is'
    """
    if "{}" not in template:
        raise ValueError(f"Template {template!r} has no '{{}}' slot for the subject.")
    lines = [f"{template.format(dx)} {dy}" for dx, dy in demos]
    return "\n".join([*lines, template.format(x)])


Segment = tuple[str, int, int]
"""A named span of a prompt: ``(name, start, end)`` (characters here, tokens in
:func:`tl_reversed.experiments.structured_patch.token_segments`)."""


def prompt_segments(prompt: str, template: str | None = None) -> list[Segment]:
    """The template segments of a prompt as character spans ``(name, start, end)``, in order.

    ICL prompts (``template=None``, :func:`icl_prompt`): per demonstration ``i``,
    ``demo{i}.Q`` (``"Q:"``), ``demo{i}.x`` (``" {x}"``), ``demo{i}.A`` (``"\\nA:"``),
    ``demo{i}.y`` (``" {y}"``), ``demo{i}.sep`` (``"\\n\\n"``); then ``query.Q``,
    ``query.x``, ``query.A``. Relation prompts (:func:`relation_prompt` with ``template``):
    per demonstration ``demo{i}.pre``, ``demo{i}.x``, ``demo{i}.post``, ``demo{i}.y``,
    ``demo{i}.sep`` (``"\\n"``); then ``query.pre``, ``query.x``, ``query.post``. A space
    before an input or an answer belongs to it (tokenizers attach it to the next word).
    The spans cover the prompt exactly; a prompt not of the format raises ValueError.
    """
    pieces = _icl_pieces(prompt) if template is None else _relation_pieces(prompt, template)
    spans, start = [], 0
    for name, text in pieces:
        spans.append((name, start, start + len(text)))
        start += len(text)
    assert "".join(text for _, text in pieces) == prompt
    return spans


def _not_format(prompt: str, what: str) -> ValueError:
    return ValueError(f"prompt {prompt!r} is not {what}: build it with tl_reversed.experiments.tasks.make_examples")


def _icl_pieces(prompt: str) -> list[tuple[str, str]]:
    blocks = prompt.split("\n\n")
    pieces: list[tuple[str, str]] = []
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        name = "query" if last else f"demo{i}"
        cut = block.rfind("\nA:")
        if not block.startswith("Q:") or cut < 2 or (last and cut != len(block) - 3) or (not last and block[cut + 3 : cut + 4] != " "):
            raise _not_format(prompt, "in the ICL format 'Q: {x}\\nA: {y}\\n\\n...Q: {x}\\nA:'")
        pieces += [(f"{name}.Q", "Q:"), (f"{name}.x", block[2:cut]), (f"{name}.A", "\nA:")]
        if not last:
            pieces += [(f"{name}.y", block[cut + 3 :]), (f"{name}.sep", "\n\n")]
    return pieces


def _relation_pieces(prompt: str, template: str) -> list[tuple[str, str]]:
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must have exactly one '{{}}' slot")
    pre, post = template.split("{}")
    space = len(pre) - len(pre.rstrip(" "))
    lines = prompt.split("\n")
    pieces: list[tuple[str, str]] = []
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        name = "query" if last else f"demo{i}"
        end = len(line) if last else line.rfind(f"{post} ") + len(post) if post else line.rfind(" ")
        if not line.startswith(pre) or end < len(pre) or not line[:end].endswith(post) or (last and end != len(line)):
            raise _not_format(prompt, f"in the relation format of template {template!r}")
        x_start = len(pre) - space
        pieces += [(f"{name}.pre", line[:x_start]), (f"{name}.x", line[x_start : end - len(post)]), (f"{name}.post", post)]
        if not last:
            pieces += [(f"{name}.y", line[end:]), (f"{name}.sep", "\n")]
    return pieces


def _target(y: str) -> str:
    """The token(s) the model should produce: the answer after one space."""
    return f" {y}"


def _prompt_builder(task: Task, template: int | str):
    """A ``(demos, x) -> prompt`` function for ``task`` and the chosen template."""
    if task.kind == "icl":
        if template != 0:
            raise ValueError(
                f"Task {task.name!r} is an ICL task with the fixed Q:/A: format; "
                f"`template` applies only to relation tasks (got {template!r})."
            )
        return icl_prompt
    if isinstance(template, str):
        chosen = template
    elif -len(task.templates) <= template < len(task.templates):
        chosen = task.templates[template]
    else:
        raise ValueError(
            f"Task {task.name!r} has {len(task.templates)} templates "
            f"{list(task.templates)}; template index {template} is out of range. "
            "Pass an index or a template string with a '{}' slot."
        )
    relation_prompt(chosen, "")  # validate the slot once, up front
    return lambda demos, x: relation_prompt(chosen, x, demos)


# --------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One prompt with its target.

    ``x``/``y`` are the query pair, ``target == " " + y``; ``demos`` are the
    (input, output) demonstrations shown in the prompt, in order (outputs as
    shown, i.e. already shuffled for corrupted prompts).
    """

    prompt: str
    target: str
    x: str
    y: str
    demos: tuple[Pair, ...] = ()


@dataclass
class ExampleSet:
    """A list of :class:`Example` with the settings that produced it.

    ``dropped`` counts candidate examples removed because their target is not a
    single token. ``length`` is the shared token length of the prompts (with
    BOS) for groups made by :func:`same_length_groups`, else None.
    """

    task: str | None
    shots: int | None
    examples: list[Example]
    dropped: int = 0
    length: int | None = None

    @property
    def prompts(self) -> list[str]:
        """The prompt strings, in order."""
        return [example.prompt for example in self.examples]

    @property
    def targets(self) -> list[str]:
        """The target strings (``" {y}"``), in order."""
        return [example.target for example in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> ExampleSet: ...

    def __getitem__(self, index: int | slice) -> Example | ExampleSet:
        """An example by position, or an ExampleSet for a slice."""
        if isinstance(index, slice):
            return replace(self, examples=self.examples[index])
        return self.examples[index]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per example: task, shots, x, y, prompt, target, n_demos."""
        columns = ["task", "shots", "x", "y", "prompt", "target", "n_demos"]
        rows = [
            (self.task, self.shots, ex.x, ex.y, ex.prompt, ex.target, len(ex.demos))
            for ex in self.examples
        ]
        return pd.DataFrame(rows, columns=columns)


def _draw_demos(
    rng: random.Random,
    train: Sequence[Pair],
    indices_by_input: dict[str, set[int]],
    x: str,
    shots: int,
) -> list[Pair]:
    """Draw ``shots`` distinct training pairs whose input differs from ``x``.

    Excluding every pair with the query's input (not just the query pair) keeps
    the answer, or a conflicting one, out of the demonstrations.
    """
    if shots == 0:
        return []
    excluded = indices_by_input.get(x, set())
    k = min(len(train), shots + len(excluded))
    picks = [i for i in rng.sample(range(len(train)), k) if i not in excluded][:shots]
    if len(picks) < shots:
        raise ValueError(
            f"Only {len(train) - len(excluded)} training pairs are available as "
            f"demonstrations for query {x!r}; cannot draw {shots}. Use fewer shots."
        )
    return [train[i] for i in picks]


def _shuffle_outputs(rng: random.Random, demos: Sequence[Pair]) -> tuple[Pair, ...]:
    """Permute the outputs among the demonstrations, inputs staying in place."""
    outputs = [y for _, y in demos]
    rng.shuffle(outputs)
    return tuple((x, y) for (x, _), y in zip(demos, outputs))


def _draw_label(draw: str) -> str:
    """The label that seeds the demonstration and label-shuffle generators of one draw.

    tl_reversed 0.1.0 named them after its module ``tl_reversed.tasks``; moving the module
    to ``tl_reversed.experiments.tasks`` changed the label, and so every draw.
    """
    return {"current": "tl_reversed.experiments.tasks", "0.1.0": "tl_reversed.tasks"}[check_option("draw", draw, DRAWS)]


def shuffled_labels(
    examples: Iterable[Example], seed: int = 0, *, build_prompt: Any = None, draw: Draw = "current"
) -> list[Example]:
    """The same examples with their demonstrations' outputs permuted (Todd et al.'s corruption).

    The one implementation of the label shuffle: ``make_examples(...,
    shuffle_labels=True)`` is ``shuffled_labels`` of the clean examples of every query
    (before the one-token filter and ``n``), so it equals ``shuffled_labels(make_examples(...),
    seed)`` whenever no example was dropped. One seeded generator walks the examples in
    order. Without ``build_prompt(demos, x)`` the prompt is rebuilt in the ICL format
    or, for a relation format, by replacing each demonstration line's label. ``draw``:
    see :func:`make_examples`.
    """
    rng = random.Random(f"{_draw_label(draw)}:labels:{seed}")
    out = []
    for i, example in enumerate(examples):
        if not hasattr(example, "demos"):
            raise TypeError(
                "cannot shuffle labels of plain (prompt, target) pairs: pass corrupted=... "
                "(make_examples(..., shuffle_labels=True))"
            )
        demos = tuple(example.demos)
        shuffled = _shuffle_outputs(rng, demos)
        if build_prompt is not None:
            prompt = build_prompt(list(shuffled), example.x)
        elif example.prompt == icl_prompt(demos, example.x):
            prompt = icl_prompt(shuffled, example.x)
        else:
            prompt = _relabel_lines(example.prompt, demos, shuffled, i)
        out.append(replace(example, prompt=prompt, demos=shuffled))
    return out


def _relabel_lines(prompt: str, demos: Sequence[Pair], shuffled: Sequence[Pair], i: int) -> str:
    """A relation prompt (one demonstration per line, then the query) with new labels."""
    lines = prompt.split("\n")
    if len(lines) != len(demos) + 1 or not all(line.endswith(f" {y}") for line, (_, y) in zip(lines, demos)):
        raise ValueError(
            f"cannot find the demonstration labels in prompt {i} ({prompt!r}): pass corrupted="
            "make_examples(..., shuffle_labels=True) with the arguments that made the clean examples"
        )
    new = [line[: len(line) - len(y)] + y_new for line, (_, y), (_, y_new) in zip(lines, demos, shuffled)]
    return "\n".join(new + [lines[-1]])


def _queries(train: tuple[Pair, ...], test: tuple[Pair, ...], split: str) -> tuple[Pair, ...]:
    """The query pairs for a split name."""
    by_split = {"test": test, "train": train, "all": test + train}
    return by_split[check_option("split", split, SPLITS)]


def _single_token_filter(model: Any, examples: list[Example]) -> tuple[list[Example], int]:
    """Keep examples whose target is exactly one token; return them and the drop count."""
    cache: dict[str, bool] = {}

    def is_single(target: str) -> bool:
        if target not in cache:
            cache[target] = model.to_tokens(target, prepend_bos=False).shape[-1] == 1
        return cache[target]

    kept = [example for example in examples if is_single(example.target)]
    return kept, len(examples) - len(kept)


def make_examples(
    task: str | Task,
    *,
    shots: int = 0,
    n: int | None = None,
    seed: int = 0,
    split: Split = "test",
    template: int | str = 0,
    shuffle_labels: bool = False,
    model: Any = None,
    draw: Draw = "current",
) -> ExampleSet:
    """Build prompts with ``shots`` demonstrations for one task.

    Args:
        task: task name (see :func:`list_tasks`) or a loaded :class:`Task`.
        shots: demonstrations per prompt (the paper uses 0, 1, 5 and 10).
        n: return at most the first ``n`` examples (applied after dropping).
        seed: fixes the train/test split (:func:`train_test_split`), the
            demonstrations and the label shuffle.
        split: which pairs become queries: ``"test"`` (the held-out third),
            ``"train"`` or ``"all"`` (test then train). Demonstrations always
            come from the training pairs, never with the query's input.
        template: relation tasks only: index into ``Task.templates`` or a
            template string with a ``{}`` slot (e.g. ``task.zs_templates[0]``).
        shuffle_labels: permute the outputs among each prompt's demonstrations
            (Todd et al.'s corrupted prompts). Queries, targets and demo inputs
            are the same as with ``shuffle_labels=False`` and the same seed,
            so clean and corrupted sets line up example by example.
        model: optional TransformerLens model (only ``model.to_tokens`` is
            used); examples whose target is not exactly one token are dropped
            and counted in ``ExampleSet.dropped``.
        draw: ``"current"``, or ``"0.1.0"`` for the demonstrations (and label shuffles)
            that tl_reversed 0.1.0 drew for the same seed. The queries and the split are
            the same under both; the two generators are seeded by different labels, so
            the demonstrations differ. The one-shot perturbation tables, the five-shot
            SmolLM2 tables and the patching table of ``docs/results`` were made by 0.1.0.

    The order of the examples follows the seeded shuffle, so the first ``n``
    are a random sample, and a smaller ``n`` gives a prefix of a larger one.
    """
    task = as_task(task)
    shots = nonnegative_int(shots, "shots")
    n = None if n is None else nonnegative_int(n, "n")
    build_prompt = _prompt_builder(task, template)
    train, test = train_test_split(task, seed)
    queries = _queries(train, test, split)

    indices_by_input: dict[str, set[int]] = {}
    for i, (x, _) in enumerate(train):
        indices_by_input.setdefault(x, set()).add(i)
    demo_rng = random.Random(f"{_draw_label(draw)}:demos:{seed}")

    examples = []
    for x, y in queries:
        demos = _draw_demos(demo_rng, train, indices_by_input, x, shots)
        examples.append(Example(build_prompt(demos, x), _target(y), x, y, tuple(demos)))
    if shuffle_labels:  # before any filtering, so the shuffle of a query never depends on the model
        examples = shuffled_labels(examples, seed, build_prompt=build_prompt, draw=draw)

    dropped = 0
    if model is not None:
        examples, dropped = _single_token_filter(model, examples)
    if n is not None:
        examples = examples[:n]
    return ExampleSet(task.name, shots, examples, dropped)


# --------------------------------------------------------------------------
# Grouping by prompt length
# --------------------------------------------------------------------------


def same_length_groups(
    model: Any, examples: ExampleSet | Iterable[Example], min_size: int = 1
) -> list[ExampleSet]:
    """Split examples into groups whose prompts have the same token length.

    Lengths come from ``model.to_tokens(prompt)`` (BOS as the model adds it).
    Groups smaller than ``min_size`` are left out; the rest are returned
    largest first (ties: shorter prompts first), each keeping the input order
    and recording its ``length``. Attention patching with a mean RA map needs
    prompts of one length.
    """
    task = examples.task if isinstance(examples, ExampleSet) else None
    shots = examples.shots if isinstance(examples, ExampleSet) else None
    by_length: dict[int, list[Example]] = {}
    for example in examples:
        length = int(model.to_tokens(example.prompt).shape[-1])
        by_length.setdefault(length, []).append(example)
    groups = [
        ExampleSet(task, shots, members, dropped=0, length=length)
        for length, members in by_length.items()
        if len(members) >= min_size
    ]
    return sorted(groups, key=lambda group: (-len(group), group.length))
