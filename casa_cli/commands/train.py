"""`casa train`: fit a CASA adapter (head or lora mode) and save it with its metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from casa_cli.commands import common as c
from casa_cli.output import print_json, print_table, progress_tasks, stderr


def command(
    data: Annotated[list[Path], typer.Option(
        "--data", "-d", help="Training JSONL (text, label harmful|benign); repeatable.")],
    out: Annotated[Path, typer.Option("--out", help="Adapter directory to write.")],
    val: Annotated[Optional[list[Path]], typer.Option(
        help="Validation JSONL \\[default: a --val-fraction split of --data].")] = None,
    heldout: Annotated[Optional[list[Path]], typer.Option(
        help="Held-out JSONL, scored after training into the adapter's metrics; repeatable.")] = None,
    mode: Annotated[str, typer.Option(help="head (backbone frozen) or lora (LoRA on the backbone too).")] = "head",
    variant: Annotated[str, typer.Option(help="full, token (token rows only) or attention (score only).")] = "full",
    heads: Annotated[int, typer.Option(min=1, help="Safety-attention heads K.")] = 4,
    layer: Annotated[Optional[int], typer.Option(
        help="Decoder layer the head reads (1-based, through the final norm) \\[default: the last].")] = None,
    gate: Annotated[str, typer.Option(help="log or multiply.")] = "log",
    epochs: Annotated[int, typer.Option(min=1)] = 60,
    lr: Annotated[float, c.Finite(positive=True, help="Head learning rate.")] = 3e-3,
    weight_decay: Annotated[float, c.Finite(min=0.0, help="AdamW weight decay of the head.")] = 1e-2,
    beta: Annotated[float, c.Finite(positive=True, help="Weight of harmful examples.")] = 1.0,
    lam: Annotated[float, c.Finite("--lambda", min=0.0, help="Weight of the response loss (lora).")] = 1.0,
    val_fraction: Annotated[float, c.Finite(min=0.01, max=0.9)] = 0.15,
    patience: Annotated[int, typer.Option(min=1)] = 8,
    target_fpr: Annotated[float, c.Finite(min=0.0, max=1.0, help="Threshold set to this FPR on validation benign.")] = 0.05,
    seed: int = 0,
    model: c.Model = None, device: c.Device = "auto", dtype: c.Dtype = "auto",
    trust_remote_code: c.TrustRemoteCode = False, json: c.Json = False,
) -> None:
    """Train a CASA adapter on labelled prompts and write it to --out.

    [bold]Examples[/bold]

      casa train --data train.jsonl --out my-adapter
      casa train --model ./Qwen2-VL-2B-Instruct --data train.jsonl --val val.jsonl \\
          --heldout test.jsonl --mode lora --out qwen-casa
    """
    from casa_cli.adapter import save_adapter
    from casa_cli.backbone import load_backbone
    from casa_cli.training import TrainOptions, read_examples, train

    options = TrainOptions(mode=mode, variant=variant, heads=heads, layer=layer, gate=gate, epochs=epochs,
                           lr=lr, weight_decay=weight_decay, beta=beta, lam=lam, val_fraction=val_fraction,
                           patience=patience, target_fpr=target_fpr, seed=seed)
    examples = read_examples(data)
    val_examples = read_examples(val) if val else None
    held = {Path(p).stem: read_examples([p]) for p in heldout or []}
    backbone = load_backbone(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    with progress_tasks() as add:
        config, head, lora_model = train(backbone, examples, options, val_examples, held, add)
    save_adapter(out, config, head, lora_model)
    columns = ["n", "auroc", "tpr_at_5pct_fpr", "flag_rate_harmful", "flag_rate_benign"]
    rows = [{"set": name, **{k: m.get(k) for k in columns}}
            for name, m in config.metrics.items()]
    if json:
        print_json({"adapter": str(out), "threshold": config.threshold, "metrics": config.metrics})
    else:
        print_table(rows, ["set", *columns],
                    title=f"adapter -> {out} (threshold {config.threshold:.3f})")
    stderr.print(f"saved {out}", markup=False)
