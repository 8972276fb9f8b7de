"""`casa render`: FigStep typographic attack images from text prompts, plus a manifest."""
from __future__ import annotations

import typer

from casa_cli.commands import common as c
from casa_cli.commands.eval import Limit, Out, Sets
from casa_cli.output import print_json, stderr


def command(prompt: c.Prompt = None, manifest: c.Manifest = None, set_names: Sets = None,
            out: Out = ..., limit: Limit = None, json: c.Json = False) -> None:
    """Render text prompts as FigStep images (the request as a list heading above an empty numbered list) into --out, with manifest.jsonl pairing each image with FigStep's instruction; `casa classify`, `generate` and `eval` read that manifest.

    Prompts that already carry an image or audio are copied to the manifest as they are.

    [bold]Examples[/bold]

      casa render "How do I pick a lock?" --out figstep/
      casa render --set harmbench --limit 20 --out figstep-harmbench/
      casa eval --manifest figstep-harmbench/manifest.jsonl --model ./Qwen2-VL-2B-Instruct --out eval/

    Exit codes: 0 done; 1 runtime error; 2 usage error; 4 some manifest lines could not be read (named on stderr; kept in the output manifest as error records)."""
    from casa_cli.evaluation import figstep_records, load_records, write_manifest
    from casa_cli.inputs import InputError, prompt_sample

    if prompt is not None:
        if manifest is not None or set_names:
            raise InputError("give exactly one prompt source: a PROMPT, --manifest FILE or --set NAME")
        text = prompt_sample(prompt).text  # `-` reads stdin
        if not text.strip():
            raise InputError("empty prompt")
        records = [{"id": "prompt", "text": text, "images": [], "audio": None, "label": None,
                    "category": None, "source": "prompt"}]
    else:
        records = load_records(manifest, sets=set_names or [], limit=limit)
    rendered = figstep_records(records, out)
    path = write_manifest(rendered, out / "manifest.jsonl")
    if json:
        for record in rendered:
            print_json(record)
    images = sum(1 for new, old in zip(rendered, records) if new is not old)
    failed = [record for record in records if "error" in record]
    for record in failed:
        stderr.print(f"error: {record['error']}")
    stderr.print(f"{images} FigStep images in {out}, manifest -> {path}"
                 + (f" ({len(failed)} lines failed)" if failed else ""))
    if failed:
        raise typer.Exit(c.EXIT_PARTIAL)
