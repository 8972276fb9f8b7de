"""Spoken prompts from held-out sources, in held-out voices: does the default's one head judge
speech as it judges the same words typed? (issue 18)

    python benchmarks/spoken_detection.py --bridge build/speech-bridge/bridge.safetensors [--limit N]

Prompts: the held-out sources' short prompts (`speech_bridge.texts_by_split`'s filter), spoken
by espeak-ng in the voices kept out of the bridge's training (`TEST_VOICES`). Each is scored
three ways, labels from the held-out split:
  - speech: SmolLM2 with Whisper tiny.en's encoder and the bridge given (assembled into a
    temporary folder) reading the clip alone, with the shipped adapter;
  - text: the text default reading the same words typed, with the same adapter;
  - bag of words: TF-IDF + logistic regression fitted on the training split, scoring the
    true transcripts (what a perfect transcribe-then-filter pipeline would see).
Writes benchmarks/results/spoken_detection.json (and the per-prompt scores beside it).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from casa_cli.data.assemble import builtin_splits, read_jsonl  # noqa: E402
from casa_cli.data.baseline import BagOfWords  # noqa: E402
from casa_cli.metrics import score_metrics  # noqa: E402
from casa_cli.speech_bridge import (TEST_VARIANTS, TEST_VOICES, clips, render,  # noqa: E402
                                    short_texts)
from casa_cli.spoken_sets import write_wav  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def summary(labels, scores, threshold) -> dict:
    m = score_metrics(labels, scores, threshold)
    harmful = [s for s, y in zip(scores, labels) if y == "harmful"]
    benign = [s for s, y in zip(scores, labels) if y != "harmful"]
    return {"auroc": round(m["auroc"], 4), "tpr_at_5pct_fpr": round(m["tpr_at_5pct_fpr"], 4),
            "tpr_at_1pct_fpr": round(m["tpr_at_1pct_fpr"], 4),
            "flagged_harmful": round(float(np.mean(np.array(harmful) >= threshold)), 4),
            "flagged_benign": round(float(np.mean(np.array(benign) >= threshold)), 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bridge", type=Path, required=True,
                        help="a trained bridge (casa_cli.speech_bridge's bridge.safetensors)")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="the head for both (default: the shipped adapter)")
    parser.add_argument("--limit", type=int, default=None, help="at most N prompts")
    parser.add_argument("--out", type=Path, default=RESULTS / "spoken_detection.json")
    args = parser.parse_args(argv)
    from safetensors.torch import load_file

    import casa_cli
    from casa_cli.cache import portable_path
    from casa_cli.pipeline import default_adapter_dir
    from casa_cli.speech_model import assemble_speech_model

    t0 = time.time()
    splits = builtin_splits()
    held_out = short_texts(read_jsonl(splits["test_ordinary"]))
    random.Random(0).shuffle(held_out)
    held_out = held_out[:args.limit]
    spoken = clips([r["text"] for r in held_out], TEST_VOICES, TEST_VARIANTS, seed=4,
                   noisy=False)
    labels = [r["label"] for r in held_out]
    adapter = str(args.adapter or default_adapter_dir())
    text = casa_cli.load(adapter=adapter)
    threshold = text.config.threshold
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = assemble_speech_model(Path(tmp) / "model", bridge=load_file(str(args.bridge)))
        speech = casa_cli.load(str(model), adapter=adapter)
        for i, (record, clip) in enumerate(zip(held_out, spoken)):
            wav = Path(tmp) / f"{i}.wav"
            write_wav(wav, render(clip))
            heard = next(iter(speech.classify([casa_cli.prompt_sample(
                "", audio=[wav], sample_id=str(i))])))
            typed = next(iter(text.classify([casa_cli.prompt_sample(
                record["text"], sample_id=str(i))])))
            rows.append({**clip, "label": record["label"], "source": record.get("source"),
                         "p_speech": heard.get("p_unsafe"), "p_text": typed.get("p_unsafe")})
            if i % 100 == 0:
                print(f"{i}/{len(held_out)} ({time.time() - t0:.0f} s)", file=sys.stderr)
    failed = [r for r in rows if r["p_speech"] is None or r["p_text"] is None]
    if failed:
        raise SystemExit(f"{len(failed)} prompts got no score (first: {failed[0]['text']!r})")
    bag = BagOfWords().fit(read_jsonl(splits["train"]))
    bag_scores = bag.score(held_out).tolist()
    result = {
        "prompts": len(rows), "harmful": labels.count("harmful"),
        "voices": sorted({r["voice"] for r in rows}), "threshold": threshold,
        "speech": summary(labels, [r["p_speech"] for r in rows], threshold),
        "text": summary(labels, [r["p_text"] for r in rows], threshold),
        "bag_of_words_transcripts": summary(labels, bag_scores, 0.5),
        "seconds": round(time.time() - t0),
        "adapter": portable_path(adapter),
        "command": f"python benchmarks/spoken_detection.py --bridge {args.bridge}"
                   + (f" --adapter {args.adapter}" if args.adapter else "")
                   + (f" --limit {args.limit}" if args.limit else ""),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    with open(args.out.with_suffix(".jsonl"), "w") as f:
        for r, b in zip(rows, bag_scores):
            f.write(json.dumps({**r, "p_bag_of_words": b}) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
