"""Spoken versions of the built-in prompt sets (issue 18), so one head learns to judge a
prompt typed or spoken: each short prompt of a split is spoken by espeak-ng into a WAV file,
and a manifest line names the clip alone as the prompt (its words kept as `transcript`).

    python -m casa_cli.spoken_sets --out build/spoken-sets [--workers 2]

    train.jsonl, val.jsonl  the train and val splits' prompts in the bridge's training voices
                            (`speech_bridge.TRAIN_VOICES`), white noise on some
    test.jsonl              the held-out sources' prompts in the held-out voices, clean: what
                            `benchmarks/spoken_detection.py` scores
    clips/                  the WAV files, named by `speech_bridge.clip_key`: a rerun speaks
                            only what is missing

`casa train --data <built-in train> --data train.jsonl --val <built-in val> --val val.jsonl`
on the assembled speech model then trains on both (`make speech-adapter`). Long prompts
(over 16 words) and non-ASCII ones stay text-only (`speech_bridge.short_texts`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from casa_cli.speech_bridge import (SAMPLE_RATE, TEST_VARIANTS, TEST_VOICES, TRAIN_VARIANTS,
                                    TRAIN_VOICES, clip_key, clips, render, short_texts)

# split: (built-in split it speaks, voices, variants, noise, seed of the clips' draws)
SPOKEN_SPLITS = {
    "train": ("train", TRAIN_VOICES, TRAIN_VARIANTS, True, 11),
    "val": ("val", TRAIN_VOICES, TRAIN_VARIANTS, True, 12),
    "test": ("test_ordinary", TEST_VOICES, TEST_VARIANTS, False, 13),
}


def write_wav(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """16-bit mono PCM, written aside and renamed: a killed run leaves no torn clip."""
    aside = path.with_suffix(f".{os.getpid()}.tmp")
    with wave.open(str(aside), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    os.replace(aside, path)


def spoken_records(records: list[dict], voices: list[str], variants: list[str], noisy: bool,
                   seed: int, folder: Path, workers: int) -> list[dict]:
    """One manifest record per short prompt of `records`: its clip (spoken into `folder`
    unless already there), label, category and source, the words as `transcript`."""
    kept = short_texts(records)
    drawn = clips([r["text"] for r in kept], voices, variants, seed=seed, noisy=noisy)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{clip_key(c)}.wav" for c in drawn]

    def speak_one(job):
        clip, path = job
        if not path.is_file():
            write_wav(path, render(clip))

    # espeak-ng runs as a subprocess, so threads keep every core busy
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(speak_one, zip(drawn, paths)))
    return [{"id": f"spoken-{path.stem}", "audio": f"{folder.name}/{path.name}",
             "label": r["label"], "category": r.get("category"),
             "source": f"spoken:{r.get('source')}", "transcript": r["text"],
             "voice": c["voice"], "snr": c["snr"]}
            for r, c, path in zip(kept, drawn, paths)]


def write_spoken_sets(out: Path, workers: int) -> dict[str, int]:
    """The spoken train, val and test manifests in `out` (clips in `out/clips`); returns
    each one's record count."""
    from casa_cli.data.assemble import builtin_splits, read_jsonl
    splits = builtin_splits()
    counts = {}
    for name, (source, voices, variants, noisy, seed) in SPOKEN_SPLITS.items():
        rows = spoken_records(read_jsonl(splits[source]), voices, variants, noisy, seed,
                              out / "clips", workers)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        counts[name] = len(rows)
        print(f"{name}: {len(rows)} clips", file=sys.stderr, flush=True)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="espeak-ng processes at once")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(write_spoken_sets(args.out, args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
