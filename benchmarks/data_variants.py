"""Does a batch of newly written prompts help detection? Issue 14's data rounds, measured on
a yardstick that stays put.

    python benchmarks/data_variants.py --add PAIRS.json [--add A.json+B.json ...] [--seeds 5]
        [--out benchmarks/results/issue14_round3/summary.json]

Each PAIRS file holds `actions` (and optionally `handwritten` lines and a `category_map`) in
the schema of `casa_cli/data/harmful_prompts.json`. They are rendered through the shipped
framings as the built-in set renders its own, normalised and categorised, and added to the
built-in **train split only**; `+` joins files into one row. Validation and held-out
splits stay the built-in ones, so the rows compare. (Putting the pairs into the prompt file
and re-assembling would re-split validation: a validation gain could not be told from a
different validation set.) Additions within SEEN_JACCARD of a validation or held-out prompt
are dropped first.

For the built-in train split, then for each `--add` row: a head fitted at the shipped
adapter's layer with its options, per seed, threshold at 5% validation FPR as `casa train`
sets it (`detection_ceiling.fit`). Reported per row, as means over seeds: validation AUROC
and TPR at 1% FPR; on the held-out sources (`test_ordinary`, `test_overrefusal`) AUROC, TPR
at 1% FPR, and at the threshold the harmful, ordinary benign and benign-but-sensitive
shares flagged and recall per harm category. **Choose on the validation columns**; the
held-out ones confirm the chosen row once. Nothing reserved is read.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from detection_ceiling import fit, shipped_options

from casa_cli.adapter import load_adapter
from casa_cli.backbone import load_backbone
from casa_cli.data.assemble import builtin_splits, read_jsonl
from casa_cli.data.forms import normalise
from casa_cli.data.grouping import unseen
from casa_cli.data.prompt_sets import HARMFUL_FILE, render_written
from casa_cli.data.taxonomy import categorise
from casa_cli.inputs import prompt_sample
from casa_cli.metrics import score_metrics
from casa_cli.pipeline import default_adapter_dir
from casa_cli.states import prompt_states
from casa_cli.training import calibrated_threshold, score

SPLITS = ("train", "val", "test_ordinary", "test_overrefusal")


def render(paths: list[Path]) -> list[dict]:
    """The pairs in `paths` as prompt records, rendered through the shipped framings."""
    shipped = json.loads(HARMFUL_FILE.read_text(encoding="utf-8"))
    added = {"actions": {}, "handwritten": [], "category_map": dict(shipped["category_map"])}
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        added["category_map"].update(data.get("category_map", {}))
        added["handwritten"] += data.get("handwritten", [])
        for kind, by_category in data.get("actions", {}).items():
            for sub, items in by_category.items():
                added["actions"].setdefault(kind, {}).setdefault(sub, []).extend(items)
    records = render_written({**shipped, **added})  # the shipped framings, the added pairs
    return [{**r, "id": "added:" + r["id"]} for r in categorise(normalise(records))]


def harmful_labels(records: list[dict]) -> list[int]:
    return [int(r["label"] == "harmful") for r in records]


def share_at(scores, threshold: float) -> float:
    """The share of `scores` flagged at `threshold`."""
    return sum(s >= threshold for s in scores) / len(scores)


def row(backbone, options, splits, states, added: list[dict], seeds: int) -> dict:
    """Heads fitted on the train split plus `added`, per seed; means and per-seed rows."""
    labels = {n: harmful_labels(recs) for n, recs in splits.items()}
    added_states = prompt_states(backbone, [prompt_sample(r["text"], sample_id=r["id"])
                                            for r in added], options.layer) if added else []
    per_seed = []
    for seed in range(seeds):
        options.seed = seed
        head = fit(backbone, options, states["train"] + added_states,
                   labels["train"] + harmful_labels(added),
                   states["val"], labels["val"])
        val = score(head, states["val"])
        threshold = calibrated_threshold(labels["val"], val, options.target_fpr)
        held = score(head, states["test_ordinary"])
        sensitive = score(head, states["test_overrefusal"])
        val_m, held_m = score_metrics(labels["val"], val), score_metrics(labels["test_ordinary"], held)
        harmful = [s for y, s in zip(labels["test_ordinary"], held) if y]
        benign = [s for y, s in zip(labels["test_ordinary"], held) if not y]
        by_category = defaultdict(list)
        for r, s in zip(splits["test_ordinary"], held):
            if r["label"] == "harmful":
                by_category[r["category"]].append(s >= threshold)
        per_seed.append({
            "seed": seed, "val_auroc": val_m["auroc"], "val_tpr_at_1pct_fpr": val_m["tpr_at_1pct_fpr"],
            "threshold": threshold, "auroc": held_m["auroc"],
            "tpr_at_1pct_fpr": held_m["tpr_at_1pct_fpr"],
            "flagged": share_at(harmful, threshold), "benign_flagged": share_at(benign, threshold),
            "sensitive_flagged": share_at(sensitive, threshold),
            "recall_by_category": {c: sum(v) / len(v) for c, v in sorted(by_category.items())}})
    numbers = [k for k, v in per_seed[0].items() if isinstance(v, float)]
    mean = {k: statistics.mean(r[k] for r in per_seed) for k in numbers}
    mean["recall_by_category"] = {c: statistics.mean(r["recall_by_category"][c] for r in per_seed)
                                  for c in per_seed[0]["recall_by_category"]}
    return {"added": len(added), "mean": mean, "seeds": per_seed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--add", action="append", default=[],
                        help="a pairs file, or files joined by +; one row each")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    backbone = load_backbone(None)
    config, _ = load_adapter(default_adapter_dir(), backbone)
    options = shipped_options(config)
    splits = {name: read_jsonl(path) for name, path in builtin_splits().items() if name in SPLITS}
    states = {name: prompt_states(backbone, [prompt_sample(r["text"], sample_id=r["id"])
                                             for r in recs], options.layer)
              for name, recs in splits.items()}
    kept_clear = splits["val"] + splits["test_ordinary"] + splits["test_overrefusal"]
    rows = {"built-in train split": row(backbone, options, splits, states, [], args.seeds)}
    for spec in args.add:
        paths = [Path(p) for p in spec.split("+")]
        rendered = render(paths)
        added = unseen(rendered, kept_clear)
        rows["+ " + "+".join(p.stem for p in paths)] = {
            **row(backbone, options, splits, states, added, args.seeds),
            "dropped_near_copies": len(rendered) - len(added)}
    for name, r in rows.items():
        m = r["mean"]
        print(f"{name} (+{r['added']}): val AUROC {m['val_auroc']:.4f} TPR@1% "
              f"{m['val_tpr_at_1pct_fpr']:.3f} | held out AUROC {m['auroc']:.4f} TPR@1% "
              f"{m['tpr_at_1pct_fpr']:.3f} flagged {100 * m['flagged']:.1f}% benign "
              f"{100 * m['benign_flagged']:.1f}% sensitive {100 * m['sensitive_flagged']:.1f}%")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"layer": options.layer, "seeds": args.seeds,
                                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
