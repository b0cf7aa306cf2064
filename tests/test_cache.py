"""The embedded model's weight cache: every file checked and repaired, unwritable folders, permissions."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
import warnings

import pytest
import torch

import tl_reversed
from tl_reversed import models
from tl_reversed.core import weight_files

PROMPT = "The capital city of France is"


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _no_cold_load(*args, **kwargs):
    raise AssertionError("the cache should have been used")


@pytest.mark.embedded
def test_every_cached_file_is_checked_and_repaired(embedded_model, tmp_path, monkeypatch):
    """Junk config.json, junk tokenizer.json and a directory where the weights belong, all at
    once: one rebuild repairs all three, and the files it writes follow the umask."""
    source_folder, source_weights = models._cache_files(models.SMOLLM2, torch.float32)
    assert weight_files.valid_cache(source_weights)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    folder, weights = models._cache_files(models.SMOLLM2, torch.float32)
    shutil.copytree(source_folder, folder)
    assert weight_files.valid_cache(weights)
    record = json.loads(weights.with_suffix(".json").read_text())
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(record["files"])

    # each file on its own makes the cache invalid
    for name, junk in (("config.json", b"{not json"), ("tokenizer.json", b"{}"), ("tokenizer_config.json", b"")):
        good = (folder / name).read_bytes()
        (folder / name).write_bytes(junk)
        assert not weight_files.valid_cache(weights), name
        (folder / name).unlink()
        assert not weight_files.valid_cache(weights), name
        (folder / name).mkdir()
        assert not weight_files.valid_cache(weights), name
        (folder / name).rmdir()
        (folder / name).write_bytes(good)
        assert weight_files.valid_cache(weights)

    (folder / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1}')  # valid, but not ours
    (folder / "tokenizer.json").write_bytes(b"\x00junk")
    weights.unlink()
    weights.mkdir()
    (weights / "stray").write_text("a directory where the weights file belongs")
    with umask(0o027):
        rebuilt = tl_reversed.load_model()

    assert weight_files.valid_cache(weights) and weights.is_file()
    tokens = embedded_model.to_tokens(PROMPT)
    with torch.no_grad():
        logits = rebuilt(tokens)
        torch.testing.assert_close(logits, embedded_model(tokens), atol=1e-4, rtol=1e-4)
    assert rebuilt.to_string(logits[0, -1].argmax()) == " Paris"
    record = json.loads(weights.with_suffix(".json").read_text())
    written = [weights, weights.with_suffix(".json"), *(folder / name for name in record["files"])]
    assert {path.name: _mode(path) for path in written} == {path.name: 0o640 for path in written}
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".partial") or p.name.startswith(".")]

    monkeypatch.setattr(models, "_load_cold", _no_cold_load)
    warm = tl_reversed.load_model()  # the repaired cache is used as it is
    with torch.no_grad():
        torch.testing.assert_close(warm(tokens), logits)


@pytest.mark.embedded
def test_unwritable_cache_warns_up_front_and_loads_without_it(embedded_model, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder would have to be inside this file")
    monkeypatch.setenv(models.CACHE_ENV, str(blocker / "cache"))

    start = time.perf_counter()
    with warnings.catch_warnings(), pytest.raises(models.CacheWarning, match=models.CACHE_ENV):
        warnings.simplefilter("error", models.CacheWarning)
        tl_reversed.load_model()
    assert time.perf_counter() - start < 15  # before the dequantization, not after it

    with pytest.warns(models.CacheWarning) as caught:
        model = tl_reversed.load_model()
    ours = [w for w in caught if issubclass(w.category, models.CacheWarning)]
    assert len(ours) == 1 and "\n" not in str(ours[0].message) and models.CACHE_ENV in str(ours[0].message)
    assert ours[0].filename == __file__  # points at the caller's load_model line
    tokens = embedded_model.to_tokens(PROMPT)
    with torch.no_grad():
        logits = model(tokens)
        torch.testing.assert_close(logits, embedded_model(tokens), atol=1e-4, rtol=1e-4)
    assert model.to_string(logits[0, -1].argmax()) == " Paris"
    assert model.tokenizer(PROMPT)["input_ids"] == embedded_model.tokenizer(PROMPT)["input_ids"]
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"] and blocker.read_text().startswith("the cache")


def test_cache_folder_is_prepared_up_front_and_follows_the_umask(tmp_path):
    folder = tmp_path / "root" / "model"
    with umask(0o027):
        mode, problem = weight_files.prepare_cache(folder)
    assert (mode, problem) == (0o640, None)
    assert (_mode(tmp_path / "root"), _mode(folder)) == (0o750, 0o750)
    assert list(folder.iterdir()) == []  # the probe is gone

    other = tmp_path / "other"
    other.write_text("a file where the model's cache folder belongs")
    with umask(0o022):
        assert weight_files.prepare_cache(other) == (0o644, None)
    assert other.is_dir()

    blocked = tmp_path / "file" / "model"
    (tmp_path / "file").write_text("")
    mode, problem = weight_files.prepare_cache(blocked)
    assert mode is None and problem.startswith(("NotADirectoryError", "FileExistsError"))
