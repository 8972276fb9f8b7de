"""Spoken prompts from held-out sources, in held-out voices: does the default's one head judge
speech as it judges the same words typed? (issue 18)

    python benchmarks/spoken_detection.py --bridge build/speech-bridge/bridge.safetensors [--limit N]

Prompts: the held-out sources' short prompts (`speech_bridge.texts_by_split`'s filter), spoken
by espeak-ng in the voices kept out of the bridge's training (`TEST_VOICES`). Each is scored
five ways, labels from the held-out split:
  - speech: SmolLM2 with Whisper tiny.en's encoder and the bridge given (assembled into a
    temporary folder) reading the clip alone, with the shipped adapter (or --adapter);
  - text: the text default reading the same words typed, with the same adapter;
  - reading: the text default, same adapter, on the bridge's own reading of the clip (the
    nearest token embedding per frame, repeats merged, blanks dropped): how much of what was
    said the frames carry, as words;
  - whisper: the same on Whisper tiny.en's own transcript of the clip (its full model, decoder
    and all, greedy): what the encoder the bridge is built on hears through the decoder it was
    trained with;
  - bag of words: TF-IDF + logistic regression fitted on the training split, scoring the
    true transcripts (what a perfect transcribe-then-filter pipeline would see).
Word error rates of the reading and the transcript, and every figure by voice, go beside.
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
from casa_cli.inputs import load_audio  # noqa: E402
from casa_cli.speech_bridge import (CTC_BLANK, SAMPLE_RATE, TEST_VARIANTS,  # noqa: E402
                                    TEST_VOICES, audio_embeddings, clips, ctc_greedy,
                                    encoder_states, render, short_texts, word_error_rate)
from casa_cli.spoken_sets import write_wav  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def summary(labels, scores, threshold) -> dict:
    m = score_metrics(labels, scores, threshold)
    if np.isnan(m["auroc"]):  # one class only (a small --limit's voice): no ranking to score
        return {"auroc": None}
    harmful = [s for s, y in zip(scores, labels) if y == "harmful"]
    benign = [s for s, y in zip(scores, labels) if y != "harmful"]
    return {"auroc": round(m["auroc"], 4), "tpr_at_5pct_fpr": round(m["tpr_at_5pct_fpr"], 4),
            "tpr_at_1pct_fpr": round(m["tpr_at_1pct_fpr"], 4),
            "flagged_harmful": round(float(np.mean(np.array(harmful) >= threshold)), 4),
            "flagged_benign": round(float(np.mean(np.array(benign) >= threshold)), 4)}


def bridge_reader(model_dir: Path):
    """audio -> the assembled model's bridge reading of it, every vocabulary token a class."""
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
    model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    embeddings = model.get_input_embeddings().weight.detach()
    vocab = list(range(embeddings.shape[0]))
    blank = processor.tokenizer.convert_tokens_to_ids(CTC_BLANK)

    def read(audio: np.ndarray) -> str:
        with torch.no_grad():
            frames = audio_embeddings(model, encoder_states(model, processor, audio))
        return processor.tokenizer.decode(ctc_greedy(frames, embeddings, vocab, blank)).strip()
    return read


def whisper_transcriber():
    """audio -> Whisper tiny.en's greedy transcript (the registry package's weights)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor

    from casa_cli.whisper_ct2 import default_model_dir, load_whisper
    model = load_whisper().eval()
    tokenizer = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    features = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    start = torch.tensor([[tokenizer.token_to_id("<|startoftranscript|>"),
                           tokenizer.token_to_id("<|notimestamps|>")]])
    end = tokenizer.token_to_id("<|endoftext|>")  # the first special token: text lies below it

    def transcribe(audio: np.ndarray) -> str:
        x = features(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        with torch.no_grad():
            ids = model.generate(x, decoder_input_ids=start, max_new_tokens=60, do_sample=False)
        return tokenizer.decode([t for t in ids[0].tolist() if t < end]).strip()
    return transcribe


SCORINGS = ("speech", "text", "reading", "whisper")


def by_voice(rows: list[dict], threshold: float) -> dict:
    """Each held-out voice's prompt count, word error rates and every scoring's figures."""
    out = {}
    for voice in sorted({r["voice"] for r in rows}):
        mine = [r for r in rows if r["voice"] == voice]
        labels = [r["label"] for r in mine]
        out[voice] = {"prompts": len(mine),
                      "wer_reading": round(float(np.mean([r["wer_reading"] for r in mine])), 4),
                      "wer_whisper": round(float(np.mean([r["wer_whisper"] for r in mine])), 4),
                      **{k: summary(labels, [r[f"p_{k}"] for r in mine], threshold)["auroc"]
                         for k in SCORINGS}}
    return out


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
    from transformers.utils import logging
    logging.set_verbosity_error()  # generate's per-call notes on Whisper's length settings

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
        read, transcribe = bridge_reader(model), whisper_transcriber()
        for i, (record, clip) in enumerate(zip(held_out, spoken)):
            wav = Path(tmp) / f"{i}.wav"
            write_wav(wav, render(clip))
            audio = load_audio(wav, SAMPLE_RATE, max_seconds=None)  # as the model reads it
            reading, transcript = read(audio), transcribe(audio)
            heard = next(iter(speech.classify([casa_cli.prompt_sample(
                "", audio=[wav], sample_id=str(i))])))
            typed, as_read, as_transcribed = text.classify([
                casa_cli.prompt_sample(words, sample_id=f"{i}-{k}")
                for k, words in enumerate([record["text"], reading, transcript])])
            rows.append({**clip, "label": record["label"], "source": record.get("source"),
                         "reading": reading, "whisper": transcript,
                         "wer_reading": word_error_rate(record["text"], reading),
                         "wer_whisper": word_error_rate(record["text"], transcript),
                         "p_speech": heard.get("p_unsafe"), "p_text": typed.get("p_unsafe"),
                         "p_reading": as_read.get("p_unsafe"),
                         "p_whisper": as_transcribed.get("p_unsafe")})
            if i % 100 == 0:
                print(f"{i}/{len(held_out)} ({time.time() - t0:.0f} s)", file=sys.stderr)
    failed = [r for r in rows if any(r[f"p_{k}"] is None for k in SCORINGS)]
    if failed:
        raise SystemExit(f"{len(failed)} prompts got no score (first: {failed[0]['text']!r})")
    bag = BagOfWords().fit(read_jsonl(splits["train"]))
    bag_scores = bag.score(held_out).tolist()
    result = {
        "prompts": len(rows), "harmful": labels.count("harmful"),
        "voices": sorted({r["voice"] for r in rows}), "threshold": threshold,
        **{k: summary(labels, [r[f"p_{k}"] for r in rows], threshold) for k in SCORINGS},
        "wer_reading": round(float(np.mean([r["wer_reading"] for r in rows])), 4),
        "wer_whisper": round(float(np.mean([r["wer_whisper"] for r in rows])), 4),
        "bag_of_words_transcripts": summary(labels, bag_scores, 0.5),
        "by_voice": by_voice(rows, threshold),
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
