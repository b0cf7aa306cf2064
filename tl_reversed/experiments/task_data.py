"""Task data: the packaged tasks, loading them, and the seeded train/test split.

Part of :mod:`tl_reversed.experiments.tasks`, which re-exports every name here and
builds prompts and examples from them.
"""

from __future__ import annotations

import difflib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tl_reversed.core.options import TaskKind

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
"""Folder holding the packaged task files."""

TEST_FRACTION = 1 / 3
"""Share of each task's distinct pairs held out as test data (as in the paper)."""

Pair = tuple[str, str]


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    """Where a task lives: its canonical ``name``, ``kind`` and data ``path``.

    ``path`` is relative to :data:`DATA_DIR`.
    """

    name: str
    kind: TaskKind
    path: str


_ICL_TASKS = (
    "adjective_v_verb_3",
    "alphabetically_first_3",
    "animal_v_object_3",
    "antonym",
    "capitalize",
    "capitalize_first_letter",
    "choose_middle_of_3",
    "country-capital",
    "english-french",
    "next_item",
    "person-sport",
    "present-past",
    "prev_item",
    "singular-plural",
    "synonym",
    "landmark-country",
    "next_capital_letter",
)

_RELATION_TASKS = {
    "company_hq": "factual",
    "landmark_in_country": "factual",
    "person_plays_pro_sport": "factual",
    "product_by_company": "factual",
    "country_capital_city": "factual",
    "verb_past_tense": "linguistic",
}


def _build_registry() -> dict[str, TaskInfo]:
    """All packaged tasks, keyed by canonical name (the upstream file stem)."""
    infos = [TaskInfo(name, "icl", f"function_vectors/{name}.json") for name in _ICL_TASKS]
    infos += [
        TaskInfo(name, "relation", f"relations/{category}/{name}.json")
        for name, category in _RELATION_TASKS.items()
    ]
    return {info.name: info for info in sorted(infos, key=lambda info: info.name)}


TASKS: MappingProxyType[str, TaskInfo] = MappingProxyType(_build_registry())
"""Read-only mapping from canonical task name to :class:`TaskInfo`."""


def normalise_task_name(name: str) -> str:
    """Lower-case ``name`` and treat ``-``, ``_`` and spaces alike.

    ``"Country-Capital"``, ``"country_capital"`` and ``"country capital"`` all
    normalise to ``"country_capital"``.
    """
    return "_".join(name.strip().lower().replace("-", " ").replace("_", " ").split())


_BY_NORMALISED = {normalise_task_name(name): name for name in TASKS}
assert len(_BY_NORMALISED) == len(TASKS), "two task names normalise to the same key"


def list_tasks() -> list[str]:
    """Sorted canonical names of all packaged tasks."""
    return sorted(TASKS)


def _resolve_name(name: str) -> str:
    """Canonical name for a user-typed task name; ValueError if unknown."""
    key = normalise_task_name(name)
    if key in _BY_NORMALISED:
        return _BY_NORMALISED[key]
    close = difflib.get_close_matches(key, list(_BY_NORMALISED), n=1, cutoff=0.5)
    hint = f" Did you mean {_BY_NORMALISED[close[0]]!r}?" if close else ""
    raise ValueError(
        f"Unknown task {name!r}.{hint} Valid tasks (hyphens and underscores are "
        f"interchangeable): {', '.join(list_tasks())}."
    )


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One task's distinct (input, output) pairs and, for relations, templates.

    ``pairs`` keeps the first occurrence of every distinct pair in file order.
    ``templates`` are the relation's few-shot cloze templates
    (``prompt_templates``) and ``zs_templates`` its zero-shot ones
    (``prompt_templates_zs``); both are empty for ICL tasks, whose prompt format
    is fixed (:func:`icl_prompt`).
    """

    name: str
    kind: TaskKind
    pairs: tuple[Pair, ...]
    templates: tuple[str, ...] = ()
    zs_templates: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.pairs)


def _read_json(relative_path: str) -> Any:
    """Parse a packaged data file."""
    with open(DATA_DIR / relative_path, encoding="utf-8") as handle:
        return json.load(handle)


def _dedupe(pairs: Iterable[Pair]) -> tuple[Pair, ...]:
    """Drop repeated pairs, keeping first occurrences in order."""
    return tuple(dict.fromkeys(pairs))


@lru_cache(maxsize=None)
def _load_canonical(name: str) -> Task:
    """Read and cache the task with canonical ``name``."""
    info = TASKS[name]
    data = _read_json(info.path)
    if info.kind == "icl":
        pairs = _dedupe((record["input"], record["output"]) for record in data)
        return Task(name, "icl", pairs)
    pairs = _dedupe((sample["subject"], sample["object"]) for sample in data["samples"])
    return Task(
        name,
        "relation",
        pairs,
        templates=tuple(data["prompt_templates"]),
        zs_templates=tuple(data["prompt_templates_zs"]),
    )


def load_task(name: str) -> Task:
    """Load a packaged task by name (hyphens/underscores/case ignored).

    Raises ValueError naming the valid tasks, and the closest one, when
    ``name`` is unknown.
    """
    return _load_canonical(_resolve_name(name))


def as_task(task: str | Task) -> Task:
    """Accept a task name or an already loaded :class:`Task`."""
    return task if isinstance(task, Task) else load_task(task)


# --------------------------------------------------------------------------
# Train/test split
# --------------------------------------------------------------------------


def _n_test(n_pairs: int) -> int:
    """Size of the held-out test set: a third, at least one pair on each side."""
    if n_pairs < 2:
        return 0
    return min(max(round(n_pairs * TEST_FRACTION), 1), n_pairs - 1)


def train_test_split(task: str | Task, seed: int = 0) -> tuple[tuple[Pair, ...], tuple[Pair, ...]]:
    """Seeded split of a task's distinct pairs into ``(train, test)``.

    The pairs are shuffled with ``random.Random(seed)``; the first third
    (rounded) is the test set, the rest the training set. Both keep the shuffled
    order, are disjoint and together hold every pair.
    """
    pairs = as_task(task).pairs
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_test = _n_test(len(pairs))
    test = tuple(pairs[i] for i in order[:n_test])
    train = tuple(pairs[i] for i in order[n_test:])
    return train, test
