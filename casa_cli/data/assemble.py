"""Assemble training and evaluation prompt sets from the packaged sources.

Pipeline (``assemble``): load -> ``normalise`` -> ``categorise`` -> ``dedup`` (near-duplicate
groups) -> ``balance_forms`` -> ``split`` (whole sources held out for test), then
``write_splits`` writes the parts as JSONL with their counts. The steps live in modules of
their own, which say why each step exists: ``prompt_sets`` (load), ``forms`` (normalise,
balance_forms), ``taxonomy`` (categorise) and ``grouping`` (dedup, split).

The default assembly is the *built-in* data (``builtin_splits``): what ``casa train`` with
no ``--data`` and ``make adapter`` train on, assembled into the cache on first use.
``limit_per_label`` cuts splits down evenly (``casa train --limit``).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from casa_cli.cache import builtin_data_root
from casa_cli.data.forms import balance_forms, normalise
from casa_cli.data.grouping import DEFAULT_HELDOUT, NEAR_DUPLICATE_JACCARD, dedup, split
from casa_cli.data.prompt_sets import SETS, MissingPackageError, load_sets
from casa_cli.data.taxonomy import categorise

# --------------------------------------------------------------------------- pipeline


def assemble(names=None, heldout_sources=DEFAULT_HELDOUT, balance: bool = True,
             val_fraction: float = 0.1, seed: int = 0,
             threshold: float = NEAR_DUPLICATE_JACCARD) -> dict[str, list[dict]]:
    """Load the named sets (all by default) and return the train/val/test split."""
    records = dedup(categorise(normalise(load_sets(names))), threshold)
    if balance:
        records = balance_forms(records)
    return split(records, heldout_sources, val_fraction, seed)


def write_jsonl(records: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summary(records: list[dict]) -> dict:
    """Counts: totals per label, label x form, label x category, source x label x form, and
    the full label x category x form x source cells (keys joined with "/")."""
    def count(*fields):
        return dict(sorted(Counter("/".join(r[f] for f in fields) for r in records).items()))

    return {"total": len(records), "rewritten": sum(1 for r in records if r.get("rewritten_from")),
            "label": count("label"), "label/form": count("label", "form"),
            "label/category": count("label", "category"),
            "source/label/form": count("source", "label", "form"),
            "label/category/form/source": count("label", "category", "form", "source")}


# Held-out sources of benign-but-sensitive prompts, scored for over-refusal on their own.
OVERREFUSAL_SOURCES = ("rho_overrefusal",)


def write_splits(parts: dict[str, list[dict]], out) -> dict[str, dict]:
    """Write ``parts`` to ``out``: train/val/test.jsonl, the test split again as
    test_ordinary.jsonl and test_overrefusal.jsonl, and summary.json. Returns the summaries."""
    out = Path(out)
    for name, recs in parts.items():
        write_jsonl(recs, out / f"{name}.jsonl")
    # The test split again in the two views the safety numbers need: ordinary prompts
    # (harmful vs everyday benign) and benign-but-sensitive ones (over-refusal).
    sensitive = [r for r in parts["test"] if r["source"] in OVERREFUSAL_SOURCES]
    write_jsonl([r for r in parts["test"] if r not in sensitive], out / "test_ordinary.jsonl")
    write_jsonl(sensitive, out / "test_overrefusal.jsonl")
    summaries = {name: summary(recs) for name, recs in parts.items()}
    (out / "summary.json").write_text(json.dumps(summaries, indent=1) + "\n", encoding="utf-8")
    return summaries


# --------------------------------------------------------------------------- built-in sets
#
# `casa train` with no --data, and `make adapter`, train on the default assembly above
# (all SETS, DEFAULT_HELDOUT, forms balanced, seed 0). It is rebuilt from the installed
# registry packages on first use (about 2 s) into the cache, keyed by everything that
# decides its content, and read from there afterwards.

BUILTIN_SPLITS = ("train", "val", "test_ordinary", "test_overrefusal")
_BUILTIN_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "test_ordinary.jsonl",
                  "test_overrefusal.jsonl", "summary.json", "inputs.json")
_BUILTIN_FORMAT = 1  # bump when the folder's layout changes


def registry_packages() -> tuple[str, ...]:
    """The registry distributions the built-in sets are read from (SETS' packages, less casa)."""
    return tuple(sorted({s["package"] for s in SETS.values()} - {"casa-cli"}))


def builtin_inputs() -> dict:
    """Everything the built-in sets are made from: the installed version of each registry
    package, and a hash of every code and data file of ``casa_cli.data`` (the loaders, this
    module, the prompts written for casa). A missing package is an InputError (exit 2)."""
    from casa_cli.inputs import InputError

    versions = {}
    for dist in registry_packages():
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise InputError(f"the built-in training sets need the registry package {dist!r}, "
                             "which is not installed: run `make setup` (or pass --data)") from None
    folder = Path(__file__).parent
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted([*folder.glob("*.py"), *folder.glob("*.json")])}
    return {"format": _BUILTIN_FORMAT, "packages": versions, "files": files}


def builtin_key(inputs: dict | None = None) -> str:
    """The version key of the built-in sets: changes whenever an input does."""
    inputs = builtin_inputs() if inputs is None else inputs
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def builtin_dir() -> Path:
    """The built-in sets' folder, assembled there first if it is not yet complete."""
    from casa_cli.inputs import InputError

    inputs = builtin_inputs()
    root = builtin_data_root()
    final = root / builtin_key(inputs)
    if all((final / name).is_file() for name in _BUILTIN_FILES):
        return final
    try:
        parts = assemble()
    except MissingPackageError as err:
        raise InputError(f"{err} (or run `make setup`)") from None
    root.mkdir(parents=True, exist_ok=True)
    # Written whole in a private folder, then renamed into place in one step, so a reader
    # never sees half the files and a second process racing this one finds either nothing
    # (and builds its own copy) or the complete folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        write_splits(parts, tmp)
        (tmp / "inputs.json").write_text(json.dumps(inputs, indent=1) + "\n", encoding="utf-8")
        if final.exists() and not all((final / name).is_file() for name in _BUILTIN_FILES):
            # incomplete (emptied by hand?): move it aside, then out of the way
            aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=root))
            try:
                os.replace(final, aside / "d")
            except OSError:
                pass  # someone else moved or replaced it meanwhile
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not all((final / name).is_file() for name in _BUILTIN_FILES):
                raise  # not a race lost to a complete copy: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; a lost race's copy
    return final


def builtin_splits() -> dict[str, Path]:
    """Paths of the built-in ``train``, ``val``, ``test_ordinary`` and ``test_overrefusal``
    JSONL files (the shipped adapter's data), assembled into
    ``$CASA_CACHE_DIR/data/<version key>`` on first use and reused afterwards."""
    folder = builtin_dir()
    return {name: folder / f"{name}.jsonl" for name in BUILTIN_SPLITS}


# --------------------------------------------------------------------------- limits


def take_evenly(items: list, k: int) -> list:
    """``k`` items spread evenly over ``items`` (the middle of each of k equal stretches), in
    their order; all of them when there are no more than ``k``."""
    n = len(items)
    if k >= n:
        return list(items)
    return [items[(2 * i + 1) * n // (2 * k)] for i in range(k)]


def limit_per_label(train: list, n: int, label, *others):
    """At most ``n`` items per label of ``train``, taken evenly (``take_evenly``), and from
    each of ``others`` (lists; None stays None) the same fraction of each label as train
    kept, rounded up so a label present stays present. Deterministic, order kept. Returns
    ``(train, *others)``."""
    def by_label(items: list) -> dict:
        groups: dict = {}
        for i, item in enumerate(items):
            groups.setdefault(label(item), []).append(i)
        return groups

    def keep(items: list, counts: dict) -> list:
        chosen = {i for lab, idx in by_label(items).items() for i in take_evenly(idx, counts[lab])}
        return [item for i, item in enumerate(items) if i in chosen]

    train_groups = by_label(train)
    fraction = {lab: min(1.0, n / len(idx)) for lab, idx in train_groups.items()}
    smallest = min(fraction.values(), default=1.0)
    limited = keep(train, {lab: min(n, len(idx)) for lab, idx in train_groups.items()})
    rest = []
    for items in others:
        if items is None:
            rest.append(None)
            continue
        counts = {lab: max(1, math.ceil(len(idx) * fraction.get(lab, smallest) - 1e-9))
                  for lab, idx in by_label(items).items()}
        rest.append(keep(items, counts))
    return (limited, *rest)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Assemble casa's prompt sets into JSONL splits.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="folder for train/val/test.jsonl and summary.json")
    where.add_argument("--builtin", action="store_true",
                       help="print the folder of the built-in sets (what `casa train` with no "
                            "--data reads), assembling it in the cache on first use; the "
                            "options below do not apply to it")
    parser.add_argument("--sets", nargs="*", default=list(SETS), help="prompt sets to load")
    parser.add_argument("--heldout", nargs="*", default=list(DEFAULT_HELDOUT), help="sources held out for test")
    parser.add_argument("--no-balance", action="store_true", help="skip form balancing")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.builtin:
        from casa_cli.inputs import InputError
        try:
            print(builtin_dir())
        except InputError as err:
            print(f"casa_cli.data.assemble: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    parts = assemble(args.sets, args.heldout, not args.no_balance, args.val_fraction, args.seed)
    summaries = write_splits(parts, args.out)
    for name, s in summaries.items():
        print(name, s["total"], s["label/form"])


if __name__ == "__main__":
    main()
