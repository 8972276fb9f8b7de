"""Does the head do better reading two decoder layers at once than one? (issue 14)

    python benchmarks/two_layers.py [--read 18 --read 30 --read 18+30 ...] [--seeds 0 1 2]
        [--out benchmarks/results/two_layers.json]

Each `--read` is one layer or several joined by "+": their states (each through the final
norm, as the head reads them) concatenated along d, so the head sees 2d features per
position and one prefill still serves it (hooks on both layers). For every read and seed a
fresh head (K = 4, log gate, the shipped options) is fitted on the built-in train split and
scored on the built-in validation split, the data the layer sweep chooses on; held-out
sources are never looked at. States come from the same per-layer cache as training, so
only layers never computed before cost a prefill.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from casa_cli.adapter import init_adapter
from casa_cli.backbone import load_backbone
from casa_cli.data.assemble import builtin_splits
from casa_cli.head import SafetyHead
from casa_cli.metrics import auroc_standard_error
from casa_cli.states import layer_states
from casa_cli.training import TrainOptions, evaluate, fit_head, label_of, read_examples

DEFAULT_READS = ("18", "30", "18+30", "15+18", "18+27")


def joined_head(backbone, width: int, options: TrainOptions) -> SafetyHead:
    """A fresh head over `width` features: Q seeded as `init_adapter` seeds it, the safety
    token rows repeated once per layer read and scaled so their logits start where the
    one-layer head's do."""
    _, one_layer = init_adapter(backbone, heads=options.heads, gate=options.gate, seed=options.seed)
    head = SafetyHead(width, heads=options.heads, gate=options.gate).float()
    copies = width // backbone.hidden_size
    generator = torch.Generator().manual_seed(options.seed)
    with torch.no_grad():
        head.Q.copy_(torch.randn(options.heads, width, generator=generator) / width ** 0.5)
        head.token_out.copy_(torch.cat([one_layer.token_out.float().cpu()] * copies, -1) / copies)
    return head.to(one_layer.Q.device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--read", action="append", help="a layer, or layers joined by +")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    reads = [[int(x) for x in read.split("+")] for read in (args.read or DEFAULT_READS)]

    backbone = load_backbone(args.model)
    splits = builtin_splits()
    train, val = read_examples([splits["train"]]), read_examples([splits["val"]])
    train_y, val_y = [label_of(s) for s in train], [label_of(s) for s in val]
    states = layer_states(backbone, train + val, sorted({n for read in reads for n in read}))
    rows = []
    for read in reads:
        joined = [torch.cat(per_layer, -1) for per_layer in zip(*(states[n] for n in read))]
        for seed in args.seeds:
            options = TrainOptions(seed=seed)
            torch.manual_seed(seed)
            head = joined_head(backbone, joined[0].shape[1], options)
            history = fit_head(head, (joined[: len(train)], train_y), (joined[len(train):], val_y),
                               options)
            m = evaluate(head, joined[len(train):], val_y)
            rows.append({"read": "+".join(map(str, read)), "seed": seed, "val_auroc": m["auroc"],
                         "val_tpr_at_1pct_fpr": m["tpr_at_1pct_fpr"],
                         "val_tpr_at_5pct_fpr": m["tpr_at_5pct_fpr"], "val_loss": m["loss"],
                         "epochs": len(history)})
    n_harmful = sum(val_y)
    print(f"validation: {len(val_y)} prompts ({n_harmful} harmful); AUROC standard error about "
          f"{auroc_standard_error(0.96, n_harmful, len(val_y) - n_harmful):.3f}")
    print("| read | val AUROC | val TPR @ 1% FPR | val TPR @ 5% FPR | val loss |  (mean ± sd over seeds "
          + " ".join(map(str, args.seeds)) + ")")
    for read in dict.fromkeys(row["read"] for row in rows):
        mine = [row for row in rows if row["read"] == read]
        cells = []
        for key in ("val_auroc", "val_tpr_at_1pct_fpr", "val_tpr_at_5pct_fpr", "val_loss"):
            values = [row[key] for row in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        print(f"| {read} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"validation": len(val_y), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
