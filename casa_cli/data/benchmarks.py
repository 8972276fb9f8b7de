"""Readers for safety benchmarks stored on the user's disk.

Every reader yields the same record shape, so evaluation code never branches on the source:

    {"id": str, "text": str, "images": [path, ...], "audio": path | None,
     "label": "harmful" | "benign" | None, "category": str | None, "source": str}

Media paths are resolved (relative ones against the file that names them) and checked to
exist while reading, so a broken benchmark fails before any model time is spent. Anything
malformed raises ``DataFormatError`` whose message starts with ``file:line``, except in a
manifest: that is read by ``casa_cli.inputs.read_manifest`` like every command's, and a
malformed line becomes a record carrying ``"error"`` (``file:line: ...``) instead.

Formats:
- ``manifest``: JSONL, one prompt per line: id, text, image | images, audio, label, category.
- ``mm-safetybench``: the MM-SafetyBench ``data/`` folder (processed_questions/*.json +
  imgs/<scenario>/{SD,TYPO,SD_TYPO}/<id>.jpg), or one scenario JSON file.
- ``jailbreakv``: JailBreakV-28K's CSV (JailBreakV_28K.csv or mini_JailBreakV_28K.csv);
  image_path is relative to the CSV's folder.
- ``figstep``: FigStep's SafeBench CSV plus its typographic images
  (query_<dataset>_<category_id>_<task_id>_6.png).
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Iterator

from .. import inputs
from ..render import FIGSTEP_PROMPT

FORMATS = ("manifest", "mm-safetybench", "jailbreakv", "figstep")

# MM-SafetyBench pairs each image type with the question variant written for it: the SD image
# shows the key phrase's scene, TYPO/SD_TYPO images carry the key phrase as text; with no
# image the original question is asked.
MMSB_QUESTION_FIELD = {"SD": "Rephrased Question(SD)", "TYPO": "Rephrased Question",
                       "SD_TYPO": "Rephrased Question", None: "Question"}


class DataFormatError(ValueError):
    """A benchmark file that cannot be read; the message starts with ``file:line``."""

    def __init__(self, path: Path | str, line: int, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line = Path(path), line


def _record(id, text, images=(), audio=None, label=None, category=None, source="") -> dict:
    return {"id": str(id), "text": text, "images": [str(p) for p in images],
            "audio": str(audio) if audio else None, "label": label,
            "category": category, "source": source}


def _media(base: Path, name, where: tuple[Path, int]) -> Path:
    """A media path resolved against ``base`` that must exist; errors point at ``where``."""
    if not isinstance(name, str) or not name.strip():
        raise DataFormatError(*where, f"media path must be a non-empty string, got {name!r}")
    path = base / Path(name).expanduser()
    if not path.is_file():
        raise DataFormatError(*where, f"file not found: {path}")
    return path


# ---------------------------------------------------------------------------- manifest


def read_manifest(path: str | Path) -> Iterator[dict]:
    """Records from a JSONL manifest, read by the reader every command shares (so ids, label
    aliases and checks are classify's). A malformed line is a record with its ``"error"``,
    which evaluation reports for each defence while the other prompts run."""
    for sample in inputs.read_manifest(Path(path)):
        record = _record(sample.id, sample.text, sample.images,
                         sample.audio[0] if sample.audio else None, sample.label,
                         sample.category, "manifest")
        error = sample.error or (f"{sample.origin}: a benchmark prompt takes at most one "
                                 "audio clip" if len(sample.audio) > 1 else None)
        if error:
            record["error"] = error
        yield record


# ---------------------------------------------------------------------------- MM-SafetyBench


def _json_key_line(source: str, key: str) -> int:
    """Line of the first ``"key":`` in a JSON text; json.load keeps no positions, and an
    error on an entry should still point at it."""
    match = re.search(r'"%s"\s*:' % re.escape(key), source)
    return source.count("\n", 0, match.start()) + 1 if match else 1


def _mmsb_scenario(path: Path, image_type: str | None) -> Iterator[dict]:
    source = path.read_text(encoding="utf-8")
    try:
        questions = json.loads(source)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, f"invalid JSON: {e.msg}") from None
    if not isinstance(questions, dict):
        raise DataFormatError(path, 1, "expected an object mapping question ids to entries")
    scenario = path.stem  # e.g. "01-Illegal_Activitiy" (the benchmark's own spelling)
    category = re.sub(r"^\d+-", "", scenario)
    field = MMSB_QUESTION_FIELD[image_type]
    images_dir = path.parent.parent / "imgs" / scenario / (image_type or "")
    for qid, entry in questions.items():
        where = (path, _json_key_line(source, qid))
        if not isinstance(entry, dict) or not isinstance(entry.get(field), str):
            raise DataFormatError(*where, f"question {qid!r} has no string {field!r}")
        images = [_media(images_dir, f"{qid}.jpg", where)] if image_type else []
        yield _record(f"{scenario}/{qid}", entry[field], images, label="harmful",
                      category=category, source="mm-safetybench")


def read_mm_safetybench(path: str | Path, image_type: str | None = "SD_TYPO") -> Iterator[dict]:
    """Records from MM-SafetyBench: ``path`` is the repository, its ``data/`` folder, or one
    ``processed_questions/<scenario>.json``. ``image_type`` is "SD", "TYPO", "SD_TYPO"
    (the paper's strongest attack, the default) or None for text-only questions.
    All prompts are harmful; category is the scenario without its number.
    """
    if image_type not in MMSB_QUESTION_FIELD:
        raise ValueError(f"image_type must be one of SD, TYPO, SD_TYPO or None, "
                         f"got {image_type!r}")
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        questions_dir = next((d for d in (path / "processed_questions",
                                          path / "data" / "processed_questions") if d.is_dir()),
                             None)
        if questions_dir is None:
            raise FileNotFoundError(f"{path}: no processed_questions/ folder (expected the "
                                    f"MM-SafetyBench data/ folder or its repository)")
        files = sorted(questions_dir.glob("*.json"))
    for file in files:
        yield from _mmsb_scenario(file, image_type)


# ---------------------------------------------------------------------------- CSV formats


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(first line of the row, row dict) for each CSV row; quoted fields may span lines."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataFormatError(path, 1, "empty file") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise DataFormatError(path, 1, f"missing column(s) {', '.join(missing)}")
        line = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataFormatError(path, line, f"bad CSV: {e}") from None
            if row:  # csv yields [] for a blank line
                if len(row) != len(header):
                    raise DataFormatError(path, line, f"{len(row)} fields, the header has "
                                                      f"{len(header)}")
                yield line, dict(zip(header, row))
            line = reader.line_num + 1


def _csv_header(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return next(csv.reader(f), [])


def read_jailbreakv(path: str | Path) -> Iterator[dict]:
    """Records from JailBreakV-28K's CSV: the jailbreak query with its image; category is the
    policy, all prompts harmful."""
    path = Path(path)
    for line, row in _csv_rows(path, ("id", "jailbreak_query", "policy", "image_path")):
        where = (path, line)
        if not row["jailbreak_query"].strip():
            raise DataFormatError(*where, "empty jailbreak_query")
        image = _media(path.parent, row["image_path"], where)
        yield _record(row["id"], row["jailbreak_query"], [image], label="harmful",
                      category=row["policy"], source="jailbreakv")


def _figstep_images_dir(csv_path: Path) -> Path:
    """FigStep's repository keeps data/question/<name>.csv beside data/images/<name>/ (names
    differ in case: safebench.csv, images/SafeBench/); images next to the CSV also work."""
    images_root = csv_path.parent.parent / "images"
    if images_root.is_dir():
        for d in images_root.iterdir():
            if d.is_dir() and d.name.lower() == csv_path.stem.lower():
                return d
    if any(csv_path.parent.glob("query_*.png")):
        return csv_path.parent
    raise FileNotFoundError(f"{csv_path}: no FigStep images found in {images_root}/"
                            f"{csv_path.stem} or beside the CSV; pass images_dir, or render "
                            f"them with casa_cli.render.render_many")


def read_figstep(path: str | Path, images_dir: str | Path | None = None) -> Iterator[dict]:
    """Records from FigStep's SafeBench CSV: FigStep's fixed instruction as text and the
    typographic image of the row's instruction; category is category_name, all harmful."""
    path = Path(path)
    images_dir = Path(images_dir) if images_dir else _figstep_images_dir(path)
    columns = ("dataset", "category_id", "task_id", "category_name")
    for line, row in _csv_rows(path, columns):
        key = f"{row['dataset']}_{row['category_id']}_{row['task_id']}"
        image = _media(images_dir, f"query_{key}_6.png", (path, line))
        yield _record(key, FIGSTEP_PROMPT, [image], label="harmful",
                      category=row["category_name"], source="figstep")


# ---------------------------------------------------------------------------- dispatch


def detect_format(path: str | Path) -> str:
    """The format name of a benchmark path, from its layout, extension and CSV header."""
    path = Path(path)
    if path.is_dir():
        if (path / "processed_questions").is_dir() or (path / "data" / "processed_questions").is_dir():
            return "mm-safetybench"
        raise ValueError(f"{path}: folder is not an MM-SafetyBench layout "
                         f"(no processed_questions/)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "manifest"
    if suffix == ".json" and path.parent.name == "processed_questions":
        return "mm-safetybench"
    if suffix == ".csv":
        header = set(_csv_header(path))
        if {"jailbreak_query", "image_path"} <= header:
            return "jailbreakv"
        if {"category_id", "task_id", "instruction"} <= header:
            return "figstep"
        raise DataFormatError(path, 1, "CSV header matches neither JailBreakV-28K "
                                       "(jailbreak_query, image_path) nor FigStep SafeBench "
                                       "(category_id, task_id, instruction)")
    raise ValueError(f"{path}: unknown benchmark format; expected one of {FORMATS}")


def read_benchmark(path: str | Path, format: str | None = None, *,
                   image_type: str | None = "SD_TYPO",
                   images_dir: str | Path | None = None) -> Iterator[dict]:
    """Records from any supported benchmark; ``format`` defaults to ``detect_format(path)``.
    ``image_type`` applies to MM-SafetyBench, ``images_dir`` to FigStep."""
    format = format or detect_format(path)
    if format == "manifest":
        return read_manifest(path)
    if format == "mm-safetybench":
        return read_mm_safetybench(path, image_type)
    if format == "jailbreakv":
        return read_jailbreakv(path)
    if format == "figstep":
        return read_figstep(path, images_dir)
    raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
