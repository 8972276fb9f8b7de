"""`casa vsfa build` and `casa vsfa train`: the VSFA recipe (arXiv 2603.08486), LoRA on
neutral questions about threat-related images (or passages), no safety labels."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from casa_cli.commands import common as c
from casa_cli.inputs import InputError
from casa_cli.output import print_json, progress_tasks, stderr

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
    from casa_cli import vsfa

    if (images is None) == (texts is None):
        raise InputError("give exactly one source: --images DIR or --texts FILE|builtin")
    if captions is not None and images is None:
        raise InputError("--captions goes with --images")
    out_dir = Path(out).parent
    if images is not None:
        items = vsfa.image_records(images, out_dir, per_item,
                                   vsfa.read_captions(captions) if captions else None)
    else:
        items = vsfa.text_records(vsfa.read_passages(texts), per_item)
    dropped = 0
    if captions is not None:
        records = [record for record, _ in items]
    else:
        from casa_cli.backbone import load_backbone
        backbone = load_backbone(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        stderr.print(f"answering {len(items)} questions with the base model", markup=False)
        records, dropped = vsfa.answer_with_model(backbone, items, max_new_tokens)
    if not records:
        raise InputError("every answer was a refusal or empty: nothing to train on")
    vsfa.write_dataset(records, out)
    summary = {"dataset": str(out), "examples": len(records), "dropped_refusals": dropped,
               "sources": len({r["source"] for r in records})}
    if json:
        print_json(summary)
    stderr.print(f"{len(records)} examples from {summary['sources']} sources "
                 f"({dropped} refusals dropped) -> {out}", markup=False)


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
    from casa_cli import vsfa
    from casa_cli.adapter import save_adapter
    from casa_cli.backbone import load_backbone

    options = vsfa.VsfaOptions(epochs=epochs, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha, seed=seed)
    examples = vsfa.read_data(data)
    backbone = load_backbone(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    with progress_tasks() as add:
        config, head, lora_model = vsfa.train(backbone, examples, options,
                                              add("vsfa lora", len(examples) * epochs))
    config.training["data"] = str(data)
    save_adapter(out, config, head, lora_model)
    if json:
        print_json({"adapter": str(out), "examples": len(examples),
                    "epoch_loss": config.training["epoch_loss"]})
    stderr.print(f"epoch loss {config.training['epoch_loss']} -> saved {out}", markup=False)
