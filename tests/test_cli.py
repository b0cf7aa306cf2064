"""The ``tl-reversed`` command line: exit codes, one-line errors, machine-readable output."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_tiny

import tl_reversed
from tl_reversed.commands.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital city of France is"
LONG_TARGET = " Paris, the city of light"


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_help_of_every_command_imports_no_torch():
    code = (
        "import sys\n"
        "from tl_reversed.commands.cli import build_parser\n"
        "parser = build_parser(); parser.format_help()\n"
        "subs = parser._subparsers._group_actions[0].choices\n"
        "[sub.format_help() for sub in subs.values()]\n"
        "print(sorted(subs), 'torch' in sys.modules)"
    )
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{sorted(COMMANDS)} False"


def test_version_and_python_m():
    done = _python("-m", "tl_reversed", "--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"tl-reversed {tl_reversed.__version__}")


def test_perturbation_help_shows_a_single_percent(capsys):
    with pytest.raises(SystemExit) as done:
        main(["perturbation", "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    assert "%%" not in text and "0-100%" in text


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command loads a model (errors must come before loading)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before checking its arguments")

    monkeypatch.setattr(tl_reversed, "load_model", refuse)


def _error(capsys, argv: list[str]) -> str:
    """Run ``main(argv)``, expect exit code 2 and one line on stderr; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


HEADS = ["heads", "--prompt", PROMPT, "--target", " Paris"]


def test_model_that_is_not_there_is_one_line(capsys, no_loading):
    line = _error(capsys, [*HEADS, "--model", "/nonexistent"])
    assert line.startswith("tl-reversed heads: error: --model '/nonexistent': no such folder")


def test_model_that_fails_to_load_is_one_line(capsys, monkeypatch):
    def broken(name=None, device=None):
        raise OSError(f"{name} has no config.json\nsecond line of detail")

    monkeypatch.setattr(tl_reversed, "load_model", broken)
    line = _error(capsys, [*HEADS, "--model", "some/model"])
    assert line.startswith("tl-reversed heads: error: cannot load model 'some/model': some/model has no config.json (")
    assert "second line" not in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(capsys, no_loading):
    line = _error(capsys, [*HEADS, "--device", "cuda"])
    assert line.startswith("tl-reversed heads: error: --device 'cuda', but CUDA is not available")


def test_unknown_device_is_one_line(capsys, no_loading):
    line = _error(capsys, [*HEADS, "--device", "banana"])
    assert line == "tl-reversed heads: error: --device 'banana' is not a torch device: use e.g. cpu, cuda or cuda:1"


@pytest.mark.parametrize(
    "argv",
    [
        ["lens", "--prompt", PROMPT, "--target", " Paris"],
        ["demo"],
        ["perturbation", "--task", "capitalize"],
        ["patching", "--task", "capitalize"],
    ],
)
def test_unwritable_out_fails_before_loading(capsys, no_loading, tmp_path, argv):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    line = _error(capsys, [*argv, "--out", str(blocker / "out")])
    assert line.startswith(f"tl-reversed {argv[0]}: error: cannot write to --out '{blocker / 'out'}' (")


@pytest.mark.parametrize("top", ["-3", "0", "2.5"])
def test_top_must_be_a_positive_integer(capsys, no_loading, top):
    with pytest.raises(SystemExit) as done:
        main([*HEADS, "--top", top])
    assert done.value.code == 2
    assert f"argument --top: expected a positive integer, got '{top}'" in capsys.readouterr().err


def test_tasks_lists_every_task_with_its_kind_and_pairs(capsys):
    from tl_reversed.experiments.tasks import TASKS, list_tasks, load_task

    assert main(["tasks", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_tasks()
    for row in rows:
        assert row["kind"] == TASKS[row["name"]].kind
        assert row["pairs"] == len(load_task(row["name"]).pairs) > 0
    assert main(["tasks", "--csv"]) == 0
    assert pd.read_csv(io.StringIO(capsys.readouterr().out)).to_dict("records") == rows
    assert main(["tasks"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in list_tasks())


# ----------------------------------------------------------------------------- computing commands


@pytest.fixture
def tiny_cli(monkeypatch):
    """Commands get a tiny random model (character tokenizer) instead of loading one."""
    model = make_tiny("llama")
    monkeypatch.setattr(tl_reversed, "load_model", lambda name=None, device=None: model)
    return model


TINY = ["--prompt", "Q: ab\nA:", "--target", " xyz"]


def test_heads_json_and_csv_are_the_results_table(capsys, tiny_cli):
    expected = tl_reversed.reversed_attention(tiny_cli, "Q: ab\nA:", " xyz").to_dataframe()
    assert main(["heads", *TINY, "--json"]) == 0
    got = pd.DataFrame(json.loads(capsys.readouterr().out))
    assert len(got) == len(expected) > 1
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, rtol=1e-6)
    assert main(["heads", *TINY, "--csv"]) == 0
    got = pd.read_csv(io.StringIO(capsys.readouterr().out))
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, rtol=1e-6)
    assert main(["heads", *TINY, "--json", "--path", "bounded"]) == 0  # the memory-bounded pass: the same norms
    bounded = pd.DataFrame(json.loads(capsys.readouterr().out))
    pd.testing.assert_frame_equal(bounded, expected, check_dtype=False, rtol=1e-4, atol=1e-6)
    printed = {}
    for path in ("standard", "bounded"):
        assert main(["heads", *TINY, "--top", "3", "--path", path]) == 0
        printed[path] = capsys.readouterr().out.splitlines()
    assert len(printed["bounded"]) == 5 and printed["bounded"][1:] == printed["standard"][1:]  # the same top heads and rows


def test_lens_json_is_the_results_table_and_writes_no_files(capsys, tiny_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = tl_reversed.backward_lens(tiny_cli, "Q: ab\nA:", " xyz", heads=False).to_dataframe()
    assert main(["lens", *TINY, "--json"]) == 0
    got = pd.DataFrame(json.loads(capsys.readouterr().out))
    assert len(got) == len(expected) > 1
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, rtol=1e-5)
    assert list(tmp_path.iterdir()) == []


def test_prediction_is_read_after_the_prompt_not_after_the_target_prefix(capsys, tiny_cli, tmp_path):
    import torch

    prompt, target = "Q: ab\nA:", " xyz"
    with torch.no_grad():
        after_prompt = tiny_cli.to_string(tiny_cli(tiny_cli.to_tokens(prompt))[0, -1].argmax())
        after_prefix = tiny_cli.to_string(tiny_cli(tiny_cli.to_tokens(prompt + target[:-1]))[0, -1].argmax())
    assert after_prompt != after_prefix  # the two readings differ for this model, so the test can tell them apart
    for argv in (["heads", *TINY], ["lens", *TINY, "--out", str(tmp_path)]):
        assert main(argv) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.endswith(f"model predicts {after_prompt!r}"), first


# ----------------------------------------------------------------------------- embedded model


def test_repeated_shots_and_tasks_count_once(capsys, tiny_cli):
    from tl_reversed.commands.cli import build_parser
    from tl_reversed.commands.common import int_list

    assert int_list("1,0,1,5,0") == [1, 0, 5]
    args = build_parser().parse_args(["sparsity", "--task", "capitalize", "--shots", "1,1", "--out", "x"])
    assert args.shots == [1]
    # the tiny character-level model drops every prompt (no one-token targets): accuracy nan, n 0
    argv = ["accuracy", "--task", "capitalize", "--task", "capitalize", "--shots", "1,0,1", "--n", "3", "--csv"]
    assert main(argv) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert table[["task", "shots", "n"]].values.tolist() == [["capitalize", 1, 0], ["capitalize", 0, 0]]
    assert main(["accuracy", "--task", "capitalize", "--shots", "1,1", "--n", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["shots", "1"]


def test_sparsity_without_any_test_prompt_is_one_line(capsys, tiny_cli, tmp_path):
    assert main(["sparsity", "--task", "capitalize", "--shots", "0,1", "--n", "3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # after the progress bar's lines
    assert "Traceback" not in err and err.splitlines()[-1] == (
        "tl-reversed sparsity: error: no test prompts for tasks ['capitalize'] at shots [0, 1]: 542 were dropped "
        "because their target is not one token of this model; choose other tasks or another model"
    )


@pytest.fixture
def embedded_cli(monkeypatch, embedded_model):
    """Commands get the session's embedded model instead of loading it again."""
    monkeypatch.setattr(tl_reversed, "load_model", lambda name=None, device=None: embedded_model)
    return embedded_model


@pytest.mark.embedded
def test_multi_token_target_reports_the_prediction_after_the_prompt(capsys, embedded_cli, tmp_path):
    assert main(["heads", "--prompt", PROMPT, "--target", LONG_TARGET, "--top", "2"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("model predicts ' Paris'"), first
    assert main(["lens", "--prompt", PROMPT, "--target", LONG_TARGET, "--out", str(tmp_path / "lens")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("model predicts ' Paris'"), first


@pytest.mark.embedded
@pytest.mark.slow
def test_demo_reports_the_prediction_after_the_prompt(embedded_model, tmp_path):
    from tl_reversed.commands.demo import write_demo

    output = write_demo(embedded_model, tmp_path, PROMPT, (LONG_TARGET, " Rome"), top=3)
    assert output.predictions == " Paris"
    assert output.report.splitlines()[0] == f"prompt {PROMPT!r}; the model predicts ' Paris'"


@pytest.mark.embedded
def test_accuracy_table_is_each_prompt_run_alone(capsys, embedded_cli, tmp_path):
    import pandas as pd
    import torch

    from tl_reversed.experiments.tasks import make_examples

    argv = ["accuracy", "--task", "capitalize", "--task", "present-past", "--shots", "0,1", "--n", "6",
            "--batch-size", "4", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    table = pd.read_csv(tmp_path / "accuracy.csv")
    assert list(zip(table.task, table.shots)) == [("capitalize", 0), ("capitalize", 1), ("present-past", 0), ("present-past", 1)]
    for row in table.itertuples():
        examples = make_examples(row.task, shots=row.shots, n=6, split="test", model=embedded_cli)
        hits = []
        for ex in examples:  # one prompt at a time, no padding, full logits
            with torch.no_grad():
                logits = embedded_cli(embedded_cli.to_tokens(ex.prompt))[0, -1]
            hits.append(int(logits.argmax()) == int(embedded_cli.to_tokens(ex.target, prepend_bos=False)[0, 0]))
        assert row.n == len(examples) == 6
        assert row.accuracy == pytest.approx(sum(hits) / len(hits), abs=1e-4)
    assert "| capitalize |" in (tmp_path / "accuracy.md").read_text()


@pytest.mark.embedded
def test_sparsity_table_is_the_summary_of_the_maps(embedded_cli, tmp_path):
    import pandas as pd

    from tl_reversed.experiments.sparsity import sparsity
    from tl_reversed.experiments.tasks import make_examples

    assert main(["sparsity", "--task", "capitalize", "--shots", "1", "--n", "3", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "sparsity.csv")
    examples = make_examples("capitalize", shots=1, n=3, split="test", model=embedded_cli)
    expected = sparsity(tl_reversed.reversed_attention(embedded_cli, examples.prompts, examples.targets)).summary()
    assert table.measure.tolist() == ["top_mass", "hoyer"] and table.n.tolist() == [3, 3]
    assert table.pairs.tolist() == expected.pairs.tolist() == [3 * 30 * 9] * 2
    assert table.ra_sparser_pairs.tolist() == expected.ra_sparser_pairs.tolist()
    assert table.ra_mean.tolist() == pytest.approx(expected.ra_mean.tolist(), abs=1e-4)
    assert "| capitalize | 1 | 3 | hoyer |" in (tmp_path / "sparsity.md").read_text()
