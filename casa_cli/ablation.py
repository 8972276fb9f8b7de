"""The ablation table of the README: which parts of CASA carry the verdict.

    python -m casa_cli.ablation --data build/data [--model DIR] [--layer N | --layer-of ADAPTER]
        [--lora-adapter DIR]

Every row is trained on the same train split, its threshold set at 5% FPR on the validation
benign prompts, and scored on the held-out sources: AUROC and TPR at 5% FPR on ordinary
prompts, and the share of benign-but-sensitive prompts flagged at the row's threshold.
Rows: bag of words (text only), a linear probe on mean-pooled states, the safety token
alone, the attention alone, and full CASA with each gate; every row but the first reads the
states of `--layer` (default: the last), or of the layer an adapter reads (`--layer-of`, the
layer `casa train --layer auto` chose for it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn import functional as F

from casa_cli.adapter import init_adapter
from casa_cli.backbone import load_backbone
from casa_cli.data.baseline import BagOfWords
from casa_cli.metrics import score_metrics
from casa_cli.states import prompt_states
from casa_cli.training import (TrainOptions, calibrated_threshold, fit_head, label_of,
                               read_examples, score)

SPLITS = ("train", "val", "test_ordinary", "test_overrefusal")


def row(name: str, scores: dict[str, list[float]], labels: dict[str, list[int]], target_fpr: float) -> dict:
    threshold = calibrated_threshold(labels["val"], scores["val"], target_fpr)
    test = score_metrics(labels["test_ordinary"], scores["test_ordinary"], threshold)
    sensitive = scores["test_overrefusal"]
    return {"method": name, "auroc": test["auroc"], "tpr_at_5pct_fpr": test["tpr_at_5pct_fpr"],
            "overrefusal": sum(s >= threshold for s in sensitive) / len(sensitive)}


def pooled_probe(states: dict, labels: dict, epochs: int = 300) -> dict[str, list[float]]:
    """Logistic regression on mean-pooled states (full batch, L2, early stop on val loss)."""
    pooled = {k: torch.stack([s.float().mean(0) for s in v]) for k, v in states.items()}
    mean, std = pooled["train"].mean(0), pooled["train"].std(0) + 1e-6
    x = {k: (v - mean) / std for k, v in pooled.items()}
    w = torch.zeros(x["train"].shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.Adam([w, b], lr=1e-2, weight_decay=1e-3)
    y = torch.tensor(labels["train"], dtype=torch.float32)
    y_val = torch.tensor(labels["val"], dtype=torch.float32)
    best, best_loss = None, float("inf")
    for _ in range(epochs):
        loss = F.binary_cross_entropy_with_logits(x["train"] @ w + b, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            val_loss = float(F.binary_cross_entropy_with_logits(x["val"] @ w + b, y_val))
        if val_loss < best_loss:
            best, best_loss = (w.detach().clone(), b.detach().clone()), val_loss
    return {k: torch.sigmoid(v @ best[0] + best[1]).tolist() for k, v in x.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by casa_cli.data.assemble")
    parser.add_argument("--model", default=None, help="model directory [default: the embedded one]")
    layer = parser.add_mutually_exclusive_group()
    layer.add_argument("--layer", type=int, default=None, help="decoder layer the head reads [default: the last]")
    layer.add_argument("--layer-of", type=Path, metavar="ADAPTER",
                       help="read the layer this adapter reads (its casa_config.json)")
    parser.add_argument("--lora-adapter", type=Path, help="a trained lora adapter to add as a row")
    parser.add_argument("--target-fpr", type=float, default=0.05)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    samples = {k: read_examples([args.data / f"{k}.jsonl"]) for k in SPLITS}
    labels = {k: [label_of(s) for s in v] for k, v in samples.items()}
    records = {k: [{"text": s.text, "label": s.label} for s in v] for k, v in samples.items()}
    bow = BagOfWords().fit(records["train"])
    rows = [row("bag of words (text)", {k: bow.score(v).tolist() for k, v in records.items()},
                labels, args.target_fpr)]

    backbone = load_backbone(args.model)
    if args.layer_of:
        args.layer = json.loads((args.layer_of / "casa_config.json").read_text()).get("layer")
    states = {k: prompt_states(backbone, v, args.layer) for k, v in samples.items()}
    rows.append(row("linear probe, mean-pooled states", pooled_probe(states, labels), labels, args.target_fpr))
    for name, variant, gate in (("safety token only", "token", "log"),
                                ("attention only", "attention", "log"),
                                ("CASA, log gate", "full", "log"),
                                ("CASA, multiply gate", "full", "multiply")):
        _, head = init_adapter(backbone, gate=gate)
        fit_head(head.float(), (states["train"], labels["train"]), (states["val"], labels["val"]),
                 TrainOptions(variant=variant, gate=gate))
        rows.append(row(name, {k: score(head, v) for k, v in states.items()}, labels, args.target_fpr))
    if args.lora_adapter:
        metrics = json.loads((args.lora_adapter / "casa_config.json").read_text())["metrics"]
        rows.append({"method": "CASA + LoRA (from its adapter)",
                     "auroc": metrics["test_ordinary"]["auroc"],
                     "tpr_at_5pct_fpr": metrics["test_ordinary"]["tpr_at_5pct_fpr"],
                     "overrefusal": metrics["test_overrefusal"]["flag_rate_benign"]})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| method | AUROC | TPR @ 5% FPR | over-refusal (sensitive benign) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['auroc']:.3f} | {r['tpr_at_5pct_fpr']:.3f} | {r['overrefusal']:.3f} |")


if __name__ == "__main__":
    main()
