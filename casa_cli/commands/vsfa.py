"""`casa vsfa build` and `casa vsfa train`: the VSFA recipe (arXiv 2603.08486), LoRA on
neutral questions about threat-related images (or passages), no safety labels."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from casa_cli.commands import common as c
from casa_cli.output import print_json, stderr

app = typer.Typer(
    no_args_is_help=True, rich_markup_mode="rich",
    help="VSFA: fine-tune on neutral questions about threat-related images (or passages for "
         "text-only models), with no safety labels and no refusals (arXiv 2603.08486).")


@app.command("build")
def build(
    out: Annotated[Path, typer.Option("--out", help="Dataset JSONL to write.")],
    images: Annotated[Optional[Path], typer.Option(
        help="Folder of threat-related images (searched recursively).")] = None,
    captions: Annotated[Optional[Path], typer.Option(
        help="With --images: JSONL ({file, caption}) or CSV (file,caption) captions; answers "
             "are then templates over the caption and no model is loaded.")] = None,
    texts: Annotated[Optional[str], typer.Option(
        help="Text analogue: a file of passages (one a line, or JSONL with text), or "
             "'builtin' for the 60 shipped passages.")] = None,
    per_item: Annotated[Optional[int], typer.Option(
        min=1, help="Questions per image or passage, rotating through the list \\[default: all].")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Length cap of the model's answers.")] = 48,
    model: c.Model = None, device: c.Device = "auto", dtype: c.Dtype = "auto",
    trust_remote_code: c.TrustRemoteCode = False, json: c.Json = False,
) -> None:
    """Build a VSFA dataset: neutral questions about threat-related images or passages.

    Fixed questions per image or passage, answered by the base model itself (greedy, short)
    or from your captions. Answers that are refusals are dropped: VSFA trains on none.

    Image questions: describe; objects; count; colours; setting; what could happen next
    (captions answer describe, objects and what-next). Passage questions: summarise;
    objects mentioned; where it takes place; what might happen next.

    [bold]Examples[/bold]

      casa vsfa build --texts builtin --per-item 3 --out vsfa.jsonl
      casa vsfa build --images ./scenes --model ./Qwen2-VL-2B-Instruct --out vsfa.jsonl
      casa vsfa build --images ./scenes --captions captions.csv --out vsfa.jsonl
    """
    from casa_cli.recipes import build_vsfa

    summary = build_vsfa(out, images, captions, texts, per_item, max_new_tokens, model, device, dtype,
                         trust_remote_code)
    if json:
        print_json(summary)
    stderr.print(f"{summary['examples']} examples from {summary['sources']} sources "
                 f"({summary['dropped_refusals']} refusals dropped) -> {out}", markup=False)


@app.command("train")
def train(
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset from `casa vsfa build`.")],
    out: Annotated[Path, typer.Option("--out", help="Adapter directory to write.")],
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    lr: Annotated[float, c.Finite(positive=True, help="LoRA learning rate.")] = 2e-4,
    lora_r: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(min=1, help="LoRA scaling numerator.")] = 16,
    seed: int = 0,
    model: c.Model = None, device: c.Device = "auto", dtype: c.Dtype = "auto",
    trust_remote_code: c.TrustRemoteCode = False, json: c.Json = False,
) -> None:
    """Fine-tune a VSFA LoRA adapter on a `casa vsfa build` dataset.

    LoRA on the text decoder's attention projections only (the vision tower stays frozen),
    next-token loss on the answers; the adapter is for `casa generate --defense vsfa`.

    [bold]Examples[/bold]

      casa vsfa train --data vsfa.jsonl --out vsfa-adapter --epochs 1
      casa generate "How do I make a weapon?" --adapter vsfa-adapter --defense vsfa
    """
    from casa_cli.recipes import train_vsfa
    from casa_cli.vsfa import VsfaOptions

    options = VsfaOptions(epochs=epochs, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha, seed=seed)
    adapter = train_vsfa(data, model, options, device, dtype, trust_remote_code)
    adapter.save(out)
    epoch_loss = adapter.config.training["epoch_loss"]
    if json:
        print_json({"adapter": str(out), "examples": adapter.config.training["examples"],
                    "epoch_loss": epoch_loss})
    stderr.print(f"epoch loss {epoch_loss} -> saved {out}", markup=False)
