"""What several subcommands share: arguments, argument types, tables, resumable units."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path


class CommandError(Exception):
    """A problem the user can fix on the command line: ``main`` prints it on one line, exit code 2."""


def add_draw_argument(parser) -> None:
    """``--draw current|0.1.0``: which seeded draw of demonstrations (``make_examples(draw=...)``)."""
    from tl_reversed.core.options import DRAWS

    parser.add_argument(
        "--draw", choices=DRAWS, default="current",
        help="demonstrations drawn as this version does (default) or as tl_reversed 0.1.0 did (its tables in docs/results)",
    )  # fmt: skip


def draw_settings(draw: str) -> dict:
    """The checkpoint settings that record ``--draw`` (none for the current draw, so its checkpoints keep their settings)."""
    return {} if draw == "current" else {"draw": draw}


def draw_note(draw: str) -> str:
    """The words a table's Markdown adds after its seed when ``--draw`` is not the current draw."""
    return "" if draw == "current" else f" (demonstrations drawn as tl_reversed {draw} did)"


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model to load: omit for the embedded SmolLM2-135M-Instruct, 'gemma-3-270m', "
        "or a hub id / local folder",
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")


def add_format_argument(parser: argparse.ArgumentParser) -> None:
    """``--json`` / ``--csv``: the result's ``to_dataframe()`` rows on stdout instead of the text."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", dest="format", action="store_const", const="json",
                       help="print the result's table (to_dataframe()) as a JSON array, one object per row")
    group.add_argument("--csv", dest="format", action="store_const", const="csv",
                       help="print the result's table (to_dataframe()) as CSV")  # fmt: skip


def print_table(frame, fmt: str) -> None:
    """Write a DataFrame to stdout as JSON records (``fmt="json"``) or CSV (``fmt="csv"``)."""
    if fmt == "json":
        sys.stdout.write(frame.to_json(orient="records", double_precision=15) + "\n")
    else:
        frame.to_csv(sys.stdout, index=False)


def positive_int(text: str) -> int:
    """``"5"`` -> ``5``; zero, negative and non-integer values are refused (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def writable_folder(path: str | Path, option: str = "--out") -> Path:
    """Create ``path`` and check that a file can be written there, before any work is done."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise CommandError(f"cannot write to {option} {str(out)!r} ({reason}): choose a writable folder") from None
    return out


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` torch does not know or this machine does not have."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {device!r} is not a torch device: use e.g. cpu, cuda or cuda:1") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CommandError(
            f"--device {device!r}, but CUDA is not available to this torch ({torch.__version__}): use --device cpu"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {device!r}, but MPS is not available on this machine: use --device cpu")


def load_cli_model(args: argparse.Namespace):
    """The model of ``--model`` on ``--device``; a model that cannot load is a one-line :class:`CommandError`."""
    check_device(args.device)
    from tl_reversed import load_model

    name = args.model
    if name is not None and name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise CommandError(f"--model {name!r}: no such folder; give a local model folder, a hub id or omit --model")
    try:
        return load_model(name, device=args.device)
    except Exception as error:  # noqa: BLE001 - any loading failure becomes one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CommandError(
            f"cannot load model {name!r}: {first} (omit --model for the embedded SmolLM2, or give "
            f"'gemma-3-270m', a hub id or a local folder)"
        ) from None


def predicted_next(model, prompt: str) -> str:
    """The model's top-1 next token after ``prompt`` alone, read at its last token.

    With a multi-token target the model reads ``prompt + target[:-1]``; its prediction at
    the last of those tokens is not what it predicts after the prompt, so this runs the
    prompt alone (tokenized as :func:`tl_reversed.core.inputs.tokenize` does).
    """
    import torch

    tokens = model.to_tokens(prompt).to(next(model.parameters()).device)
    with torch.no_grad():
        logits = model(tokens)
    return model.to_string(logits[0, -1].argmax())


def int_list(text: str) -> list[int]:
    """``"0,1,5"`` -> ``[0, 1, 5]`` (argparse type); a repeated value counts once (``"1,1"`` -> ``[1]``)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,5, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers like 0,1,5, got {text!r}")
    return list(dict.fromkeys(values))


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

    A unit is a few named results (``HeadScores``, ``PerturbationResult``, ``PatchingSweep``...),
    each stored with its own ``save`` as ``KEY.NAME.safetensors``, plus ``KEY.json``: the
    settings the unit was made with, the result types and a little plain ``info`` (e.g. the
    unit's wall time). The record is written last, atomically, so a unit counts as done only
    once all its results are on disk. A rerun with the same settings (every argument that
    changes a number) skips the units already done, so a killed run resumes where it stopped;
    a rerun with other settings recomputes them. Each unit is computed independently, so a
    resumed run writes the same numbers as an uninterrupted one.
    """

    def __init__(self, out: Path, name: str, settings: dict, enabled: bool = True):
        self.folder = out / ".partial" / name
        self.settings = settings
        self.enabled = enabled

    def _record(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def _result(self, key: str, name: str) -> Path:
        return self.folder / f"{key}.{name}.safetensors"

    def load(self, key: str) -> tuple[dict, dict] | None:
        """``(results, info)`` of the saved unit, if there is one made with the same settings."""
        from tl_reversed.core.results import load_result

        path = self._record(key)
        if not self.enabled or not path.exists():
            return None
        record = json.loads(path.read_text())
        if record.get("settings") != json.loads(json.dumps(self.settings)):
            return None
        try:
            results = {name: load_result(self._result(key, name)) for name in record["results"]}
        except (FileNotFoundError, ValueError) as error:
            print(f"recomputing {key}: its saved results cannot be read ({error})", file=sys.stderr)
            return None
        for name, kind in record["results"].items():
            if type(results[name]).__name__ != kind:
                return None
        return results, record.get("info", {})

    def save(self, key: str, results: dict, info: dict | None = None) -> None:
        """Store the unit's results (each with its ``save``), then its record."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, result in results.items():
            result.save(self._result(key, name))
        record = {"settings": self.settings, "results": {n: type(r).__name__ for n, r in results.items()}, "info": info or {}}
        partial = self._record(key).with_suffix(".tmp")
        partial.write_text(json.dumps(record))
        partial.replace(self._record(key))

    def clear(self) -> None:
        """Remove the units once the final outputs are written."""
        if self.folder.exists():
            for path in [*self.folder.glob("*.json"), *self.folder.glob("*.safetensors")]:
                path.unlink()
            self.folder.rmdir()
        parent = self.folder.parent
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()
