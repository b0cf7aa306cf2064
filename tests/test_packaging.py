"""Packaging: the declared floors are real, the version is written once, the sdist and
wheel carry what they should, and committed notebooks hold no local paths."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _requirements() -> dict[str, Requirement]:
    reqs = (Requirement(line) for line in PROJECT["dependencies"])
    return {req.name.lower().replace("_", "-"): req for req in reqs}


def _floor(spec: SpecifierSet) -> Version:
    floors = [Version(s.version) for s in spec if s.operator in (">=", "==", "~=")]
    assert len(floors) == 1, f"expected one lower bound in {spec}"
    return floors[0]


def _makefile_pins(variable: str) -> dict[str, Version]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{variable}\s*:=(.*)$", text, re.M)
    assert match, f"{variable} is not set in the Makefile"
    pins = {}
    for item in match.group(1).split():
        name, version = item.split("==")
        pins[name.lower()] = Version(version)
    return pins


def test_python_floor_is_311():
    spec = SpecifierSet(PROJECT["requires-python"])
    assert "3.10" not in spec, "hashlib.file_digest (tl_reversed.models) needs Python 3.11"
    assert "3.11" in spec and "3.12" in spec


def test_transformer_lens_floor_has_the_bridge():
    spec = _requirements()["transformer-lens"].specifier
    assert _floor(spec) >= Version("3.0"), "transformer_lens.model_bridge exists from TransformerLens 3.0"
    assert "2.18.0" not in spec
    assert "4.3.0" in spec


def test_floors_are_the_versions_the_legacy_environment_tests():
    """Every package the legacy environment pins is declared with that version as its floor."""
    requirements = _requirements()
    pins = _makefile_pins("LEGACY_PINS") | _makefile_pins("TORCH")
    assert {"transformer-lens", "transformers", "torch"} <= pins.keys()
    for name, version in pins.items():
        assert name in requirements, f"{name} is pinned in the Makefile but not a dependency"
        assert _floor(requirements[name].specifier) == version, (name, str(requirements[name].specifier), version)


def test_load_model_without_the_bridge_says_what_to_install(monkeypatch):
    import torch

    from tl_reversed import models

    monkeypatch.setitem(sys.modules, "transformer_lens.model_bridge", None)  # as on TransformerLens 2.x
    installed = importlib.metadata.version("transformer-lens")
    for call in (
        lambda: models.load_model("some/hub-model"),
        lambda: models._boot(None, None, "folder", torch.float32, None),  # the embedded models' path
    ):
        with pytest.raises(ImportError) as info:
            call()
        message = str(info.value)
        assert f"transformer-lens {installed} is installed" in message
        assert f"pip install 'transformer-lens{_requirements()['transformer-lens'].specifier}'" in message


def test_version_is_written_once():
    import tl_reversed

    assert "version" in PROJECT.get("dynamic", []) and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tl_reversed.__version__"}
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:  # an unpacked sdist: no git
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    written = re.compile(rf"""version[\W_]{{0,20}}["']{re.escape(tl_reversed.__version__)}["']""", re.I)
    hits = [
        name
        for name in files
        if name.endswith((".py", ".toml", ".cfg", ".txt", ".in"))
        and written.search((ROOT / name).read_text(errors="ignore"))
    ]
    assert hits == ["tl_reversed/__init__.py"]


def test_package_is_typed():
    assert (ROOT / "tl_reversed" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["tl_reversed"]


LOCAL_PATH = re.compile(r"(?<![\w.])(/root/|/work/|/home/|/Users/|/tmp/|[A-Za-z]:\\\\)|site-packages")


@pytest.mark.parametrize("path", sorted((ROOT / "demos").glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebook_outputs_hold_no_local_path(path):
    nb = json.loads(path.read_text())
    for index, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []):
            text = json.dumps({k: v for k, v in output.items() if k != "data"})
            text += json.dumps({k: v for k, v in output.get("data", {}).items() if k.startswith("text/")})
            found = LOCAL_PATH.search(text)
            assert found is None, f"cell {index} output holds a local path: ...{text[max(0, found.start() - 60) : found.end() + 60]}..."


@pytest.mark.slow
def test_sdist_and_wheel(tmp_path):
    """`python -m build` makes a complete sdist (the tests collect from it) and a typed wheel."""
    import tl_reversed

    try:
        import build  # noqa: F401
    except ImportError:
        pytest.fail("the `build` package is missing: it is in the test extras (pip install -e '.[test]')")
    dist = tmp_path / "dist"
    # --no-isolation: the environment's setuptools, no download
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    version = tl_reversed.__version__
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    assert version in sdist.name and version in wheel.name

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(zf.read(metadata_name).decode())
    assert "tl_reversed/py.typed" in names
    assert any(n.startswith("tl_reversed/data/") for n in names)
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Version"] == version
    assert metadata.get_all("Project-URL") is None and metadata["Home-page"] is None  # no URL the project cannot confirm
    assert metadata["Requires-Python"] == PROJECT["requires-python"]

    with tarfile.open(sdist) as tf:
        tf.extractall(tmp_path / "unpacked", filter="data")
    (top,) = (tmp_path / "unpacked").iterdir()
    for required in (
        "tests/conftest.py",
        "tests/test_packaging.py",
        "CHANGELOG.md",
        "LICENSE",
        "Makefile",
        "mkdocs.yml",
        "benchmarks/__init__.py",
        "demos/01_quickstart.ipynb",
        "docs/results/README.md",
        "docs/index.md",
        "tl_reversed/py.typed",
    ):
        assert (top / required).is_file(), f"{required} is missing from the sdist"

    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=top,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(top)},
    )
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert re.search(r"\d+ tests? collected", collected.stdout), collected.stdout[-1000:]
