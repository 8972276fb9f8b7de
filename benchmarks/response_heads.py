"""Response heads side by side on the same (prompt, response) records (issue 17).

    python benchmarks/response_heads.py --data build/responses/test.jsonl \
        --adapter casa_cli/adapters/smollm2-135m-instruct/response --adapter build/other/response

`casa train` reports each head on its own held-out split; a new recipe changes that split,
so heads trained from different recipes are compared here on one manifest (a
`response_recipe` split, written by `python -m casa_cli.response_recipe`). For each head
and each source of the manifest: AUROC and TPR at 1% FPR over every record (prefixes
included), AUROC of the highest score over each answer and its prefixes (what the monitor,
taking the first check over the threshold, acts on), and the share of whole answers, by
label, at or above the head's own threshold.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from casa_cli.adapter import load_adapter
from casa_cli.backbone import load_backbone
from casa_cli.metrics import score_metrics
from casa_cli.states import prompt_states
from casa_cli.training import label_of, read_examples, score


def head_report(records: list[dict], scores: list[float], threshold: float) -> dict:
    """The metrics above for one head, over all records and per source."""
    report = {}
    for source in ["all"] + sorted({r["source"] for r in records}):
        mine = [(r, s) for r, s in zip(records, scores) if source in ("all", r["source"])]
        answers = defaultdict(list)  # "<id>@<cut>" is a prefix of the answer "<id>"
        for r, s in mine:
            answers[r["id"].split("@")[0]].append((r["harmful"], s))
        per_record = score_metrics([r["harmful"] for r, _ in mine], [s for _, s in mine])
        per_answer = score_metrics([v[0][0] for v in answers.values()],
                                   [max(s for _, s in v) for v in answers.values()])
        whole = [(r["harmful"], s >= threshold) for r, s in mine if "@" not in r["id"]]
        flagged = {name: (sum(f for y, f in whole if y == label) /
                          max(sum(y == label for y, _ in whole), 1))
                   for name, label in (("harmful_flagged", 1), ("benign_flagged", 0))}
        report[source] = {"records": len(mine), "auroc": per_record["auroc"],
                          "tpr_at_1pct_fpr": per_record["tpr_at_1pct_fpr"],
                          "answers": len(answers), "answer_max_auroc": per_answer["auroc"],
                          **flagged}
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a response manifest")
    parser.add_argument("--adapter", type=Path, action="append", required=True,
                        help="a response head's folder (an adapter's response/)")
    parser.add_argument("--model", default=None, help="model directory [default: the embedded one]")
    parser.add_argument("--out", type=Path, default=None, help="write the reports as JSON")
    args = parser.parse_args(argv)
    backbone = load_backbone(args.model)
    samples = read_examples([args.data])  # a malformed or unlabelled line stops it
    records = [{"id": s.id, "source": s.extra.get("source", ""), "harmful": label_of(s)}
               for s in samples]
    reports = {}
    for folder in args.adapter:
        config, head = load_adapter(folder, backbone)
        scores = score(head.float(), prompt_states(backbone, samples, config.layer))
        reports[str(folder)] = {"threshold": config.threshold,
                                "by_source": head_report(records, scores, config.threshold)}
        for source, m in reports[str(folder)]["by_source"].items():
            print(f"{folder} {source}: {m['records']} records AUROC {m['auroc']:.4f} TPR@1% "
                  f"{m['tpr_at_1pct_fpr']:.3f}; {m['answers']} answers, max-over-prefixes "
                  f"AUROC {m['answer_max_auroc']:.4f}; at threshold {config.threshold:.3f} "
                  f"flags {100 * m['harmful_flagged']:.1f}% harmful, "
                  f"{100 * m['benign_flagged']:.1f}% benign")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"data": str(args.data), "heads": reports}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
