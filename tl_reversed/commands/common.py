"""What several subcommands share: arguments, argument types, tables, resumable units."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model to load: omit for the embedded SmolLM2-135M-Instruct, 'gemma-3-270m', "
        "or a hub id / local folder",
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")


def int_list(text: str) -> list[int]:
    """``"0,1,5"`` -> ``[0, 1, 5]`` (argparse type)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,5, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers like 0,1,5, got {text!r}")
    return values


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub Markdown table (numbers as given, already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command as typed (program name shortened to ``tl-reversed``)."""
    return " ".join(["tl-reversed", *(shlex.quote(a) for a in sys.argv[1:])])


class Checkpoint:
    """Finished units of a long command, kept under ``OUT/.partial/`` until the command completes.

    A rerun with the same settings (every argument that changes a number) skips the units
    already done, so a killed run resumes where it stopped. Each unit is computed
    independently, so a resumed run writes the same numbers as an uninterrupted one.
    """

    def __init__(self, out: Path, name: str, settings: dict, enabled: bool = True):
        self.folder = out / ".partial" / name
        self.settings = settings
        self.enabled = enabled

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str) -> dict | None:
        """The saved unit, if there is one made with the same settings."""
        path = self._path(key)
        if not self.enabled or not path.exists():
            return None
        record = json.loads(path.read_text())
        return record["payload"] if record.get("settings") == self.settings else None

    def save(self, key: str, payload: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self._path(key).with_suffix(".tmp")
        partial.write_text(json.dumps({"settings": self.settings, "payload": payload}))
        partial.replace(self._path(key))

    def clear(self) -> None:
        """Remove the units once the final outputs are written."""
        if self.folder.exists():
            for path in self.folder.glob("*.json"):
                path.unlink()
            self.folder.rmdir()
        parent = self.folder.parent
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()
