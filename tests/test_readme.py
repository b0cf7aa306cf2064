"""The README is a test: its Python blocks run as written, its real output is the command's output.

Every ```python block of README.md runs, in order, in one namespace, with the embedded
model (the blocks load it with ``tr.load_model()``, from the warm cache); the ```text
block after "real output" must equal what ``tl-reversed heads`` prints for the command
the README names. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = [pytest.mark.embedded, pytest.mark.slow]


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_readme_has_the_blocks_this_test_reads():
    assert len(blocks("python")) >= 4
    assert "real output" in README.read_text()


@pytest.fixture
def no_display(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def test_python_blocks_run_in_order(embedded_model, monkeypatch, no_display, tmp_path):
    import tl_reversed
    from tl_reversed.core.state import hook_count

    monkeypatch.setattr(tl_reversed, "load_model", lambda *args, **kwargs: embedded_model)  # the session's copy
    monkeypatch.chdir(tmp_path)  # files the blocks write (map.html) land here
    flags = [p.requires_grad for p in embedded_model.parameters()]
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(blocks("python")):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    # what the blocks say in comments, checked on what they computed
    assert namespace["ra"].top_heads(5) == [(12, 0), (2, 3), (11, 7), (14, 7), (12, 3)]
    assert namespace["batch"].norms.shape == (3, 30, 9)
    assert namespace["paris"].top_heads(5) == namespace["ra"].top_heads(5)
    assert (tmp_path / "map.html").exists()
    assert namespace["answer"].text == "\n\nThe answer"  # the segment-mask section's untuned continuation
    assert hook_count(embedded_model) == 0
    assert [p.requires_grad for p in embedded_model.parameters()] == flags
    assert all(p.grad is None for p in embedded_model.parameters())


def test_real_output_is_what_the_command_prints(embedded_model, monkeypatch, capsys):
    import tl_reversed
    from tl_reversed.commands.cli import main

    text = README.read_text()
    command = re.search(r"table comes from `(tl-reversed heads [^`]*)`", text)
    assert command, "the README must name the tl-reversed heads command its real output comes from"
    after = text[text.index("real output") :]
    shown = re.search(r"^```text\n(.*?)^```$", after, flags=re.S | re.M).group(1)
    monkeypatch.setattr(tl_reversed, "load_model", lambda *args, **kwargs: embedded_model)
    assert main(shlex.split(command.group(1))[1:]) == 0
    printed = capsys.readouterr().out
    assert printed == shown
