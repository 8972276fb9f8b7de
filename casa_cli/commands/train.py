"""`casa train`: fit a CASA adapter (head or lora mode) and save it with its metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from casa_cli.commands import common as c
from casa_cli.output import print_json, print_table, stderr


def command(
    out: Annotated[Path, typer.Option("--out", help="Adapter directory to write.")],
    data: Annotated[Optional[list[Path]], typer.Option(
        "--data", "-d", help="Training JSONL (text, label harmful|benign); repeatable "
        "\\[default: the built-in sets that make the shipped adapter, assembled from the "
        "installed registry packages into $CASA_CACHE_DIR/data on first use].")] = None,
    val: Annotated[Optional[list[Path]], typer.Option(
        help="Validation JSONL \\[default: the built-in val split without --data, "
        "else a --val-fraction split of --data].")] = None,
    heldout: Annotated[Optional[list[Path]], typer.Option(
        help="Held-out JSONL, scored after training into the adapter's metrics; repeatable "
        "\\[default without --data: the built-in test_ordinary and test_overrefusal].")] = None,
    limit: Annotated[Optional[int], typer.Option(
        min=1, help="At most N training examples per label, taken evenly (deterministic), and "
        "the same share of each label from --val and --heldout: for a quick try.")] = None,
    mode: Annotated[str, typer.Option(help="head (backbone frozen) or lora (the head, then a LoRA that writes the model's own "
        "refusal after <|unsafe|>; off for the prompt and after <|safe|>).")] = "head",
    variant: Annotated[str, typer.Option(help="full, token (token rows only) or attention (score only).")] = "full",
    heads: Annotated[int, typer.Option(min=1, help="Safety-attention heads K.")] = 4,
    layer: Annotated[str, typer.Option(
        callback=c.parse_layer, metavar="auto|last|N",
        help="Decoder layer the head reads (1-based, through the final norm). auto: fit the "
        "head at each candidate layer, all read in one prefill per prompt; of the layers whose "
        "validation AUROC is within one standard error of the best, keep the highest "
        "validation TPR at 1% FPR; held-out sets are never used to choose. Candidates: the "
        "last layer and every ceil(L/10)-th layer below it down to a quarter of the depth "
        "(8 at most; 30 layers: 9, 12, ..., 27, 30).")] = "auto",
    layers: Annotated[Optional[str], typer.Option(
        callback=c.parse_layers, metavar="N,N,...",
        help="The candidates of --layer auto, e.g. 9,12,15 \\[default: the rule above].")] = None,
    gate: Annotated[str, typer.Option(help="log or multiply.")] = "log",
    epochs: Annotated[int, typer.Option(min=1)] = 60,
    lr: Annotated[float, c.Finite(positive=True, help="Head learning rate.")] = 3e-3,
    weight_decay: Annotated[float, c.Finite(min=0.0, help="AdamW weight decay of the head.")] = 1e-2,
    beta: Annotated[float, c.Finite(positive=True, help="Weight of harmful examples.")] = 1.0,
    val_fraction: Annotated[float, c.Finite(min=0.01, max=0.9)] = 0.15,
    patience: Annotated[int, typer.Option(min=1)] = 8,
    target_fpr: Annotated[float, c.Finite(min=0.0, max=1.0, help="Threshold set to this FPR on validation benign.")] = 0.05,
    seed: int = 0,
    model: c.Model = None, device: c.Device = "auto", dtype: c.Dtype = "auto",
    trust_remote_code: c.TrustRemoteCode = False, json: c.Json = False,
) -> None:
    """Train a CASA adapter on labelled prompts and write it to --out.

    Without --data it trains on the built-in sets, the data of the shipped adapter: their
    train split, their val split as --val and their two test splits as --heldout (each
    unless given). Records with a `response` train a response head on the (prompt,
    response) pairs: save it as the prompt adapter's response/ folder, at its layer.

    [bold]Examples[/bold]

      casa train --model ./Qwen2.5-VL-3B-Instruct --out qwen-casa
      casa train --model ./Qwen2.5-VL-3B-Instruct --limit 50 --epochs 5 --out try-casa
      casa train --data train.jsonl --out my-adapter
      casa train --model ./Qwen2-VL-2B-Instruct --data train.jsonl --val val.jsonl \\
          --heldout test.jsonl --mode lora --out qwen-casa
      casa train --data pairs.jsonl --layer 18 --target-fpr 0.01 --out my-adapter/response
    """
    from casa_cli.recipes import train
    from casa_cli.training import TrainOptions

    options = TrainOptions(mode=mode, variant=variant, heads=heads, layer=layer, layers=layers, gate=gate, epochs=epochs,
                           lr=lr, weight_decay=weight_decay, beta=beta, val_fraction=val_fraction,
                           patience=patience, target_fpr=target_fpr, seed=seed)
    adapter = train(model, data, val, heldout, limit, options, device=device, dtype=dtype,
                    trust_remote_code=trust_remote_code)
    adapter.save(out)
    config = adapter.config
    columns = ["n", "auroc", "tpr_at_5pct_fpr", "flag_rate_harmful", "flag_rate_benign"]
    rows = [{"set": name, **{k: m.get(k) for k in columns}} for name, m in config.metrics.items()]
    if json:
        print_json({"adapter": str(out), "threshold": config.threshold, "layer": config.layer,
                    "layer_sweep": config.training.get("layer_sweep"), "metrics": config.metrics})
    else:
        if config.training.get("layer_sweep"):
            sweep = [{**r, "layer": f"{r['layer']}{' *' if r['chosen'] else ''}"}
                     for r in config.training["layer_sweep"]]
            print_table(sweep, ["layer", "val_auroc", "val_loss", "val_tpr_at_1pct_fpr"],
                        title="layer sweep on validation (* chosen)", compact=True)
        print_table(rows, ["set", *columns],
                    title=f"adapter -> {out} (threshold {config.threshold:.3f})")
    stderr.print(f"saved {out}", markup=False)
