"""`casa eval`: compare defences on labelled prompts; records, report and metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from casa_cli.commands import common as c
from casa_cli.output import print_json, stderr

Sets = Annotated[Optional[list[str]], typer.Option(
    "--set", help="A registry prompt set by name (repeatable): harmbench, advbench, pyrit_airt, "
                  "pyrit_benign, rho_refusal, rho_overrefusal, guardmeter, casa_benign, "
                  "casa_harmful, casa_benign_pairs.")]
Limit = Annotated[Optional[int], typer.Option(
    min=1, help="At most N prompts of each label from each source, spread evenly over it.")]
Out = Annotated[Path, typer.Option("--out", help="Folder for the output.")]


def command(
    manifest: c.Manifest = None,
    benchmark: Annotated[Optional[Path], typer.Option(
        help="A benchmark on disk: MM-SafetyBench data/ folder, JailBreakV-28K CSV, FigStep "
             "SafeBench CSV, or a JSONL manifest.")] = None,
    format: Annotated[Optional[str], typer.Option(
        help="--benchmark's format: manifest, mm-safetybench, jailbreakv or figstep "
             "\\[default: detected].")] = None,
    set_names: Sets = None,
    render: Annotated[Optional[str], typer.Option(
        help="figstep: replay every text prompt as a FigStep typographic image attack "
             "(needs a model that reads images).")] = None,
    defenses: Annotated[str, typer.Option(
        help="Comma-separated defences to compare: casa, coca, prompt, vsfa (needs a VSFA adapter), none.")] = "none,prompt,coca,casa",
    out: Out = ..., limit: Limit = None,
    max_new_tokens: Annotated[int, typer.Option(
        min=1, help="Tokens written per answer; judges read the opening, so a few dozen do.")] = 64,
    threshold: c.Threshold = None,
    judge_model: Annotated[Optional[Path], typer.Option(
        help="Judge refusals with this local instruct/guard model \\[default: the phrase judge].")] = None,
    model: c.Model = None, adapter: c.Adapter = None, device: c.Device = "auto",
    device_map: c.DeviceMap = None,
    dtype: c.Dtype = "auto", kernel: c.Kernel = "auto",
    trust_remote_code: c.TrustRemoteCode = False, truncate: c.Truncate = False,
    max_audio_seconds: c.MaxAudioSeconds = None,
    resume: Annotated[bool, typer.Option(
        help="Keep DIR/records.jsonl and skip the (defence, id) pairs it already answers "
             "(failed ones are retried).")] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Answer labelled prompts under each defence, judge each answer refused or not, and report attack success, over-refusal and CASA's detection metrics.

    Writes to --out: records.jsonl (one result per defence and prompt, flushed), report.md, roc.png, tradeoff.png and metrics.json; with --render figstep also figstep/ (the images and a manifest of them).

    [bold]Examples[/bold]

      casa eval --set harmbench --set rho_overrefusal --limit 50 --out eval/
      casa eval --benchmark MM-SafetyBench/data --model ./Qwen2-VL-2B-Instruct --out mmsb/
      casa eval --set advbench --render figstep --model ./Qwen2-VL-2B-Instruct --out figstep/
      casa eval --manifest mine.jsonl --defenses none,casa --out eval/ --resume --json
      torchrun --nproc-per-node 4 -m casa_cli eval --set harmbench --out eval/

    Exit codes: 0 done; 1 runtime error; 2 usage error or malformed benchmark; 4 some prompts failed (error records are in records.jsonl)."""
    from casa_cli import distributed
    from casa_cli.decoding import DEFENSES, DecodeOptions
    from casa_cli.evaluation import (RENDERERS, collect, evaluate, figstep_records, load_judge,
                                     load_records, result_key, summarise, to_sample,
                                     write_manifest, write_outputs)
    from casa_cli.report import print_table

    names = [d.strip() for d in defenses.split(",") if d.strip()]
    bad = [d for d in names if d not in DEFENSES]
    if bad or not names or len(set(names)) != len(names):
        raise typer.BadParameter(f"{defenses!r}: give distinct names from {', '.join(DEFENSES)}",
                                 param_hint="--defenses")
    if render is not None and render not in RENDERERS:
        raise typer.BadParameter(f"{render!r} is not one of {', '.join(RENDERERS)}", param_hint="--render")
    if format is not None and benchmark is None:
        raise typer.BadParameter("--format goes with --benchmark", param_hint="--format")
    records_path = out / "records.jsonl"
    c.check_output(records_path, manifest, benchmark)
    records = load_records(manifest, benchmark, format, set_names or [], limit)

    with distributed.launched(device, device_map) as world:
        casa = c.load_casa(model, adapter, world.device(device), dtype, kernel, trust_remote_code,
                           device_map, max_audio_seconds=max_audio_seconds)
        if render:
            if "image" not in casa.backbone.modalities:
                raise typer.BadParameter(
                    f"{casa.backbone.source} ({casa.backbone.family}) takes no images, so FigStep "
                    "images cannot be evaluated on it; pick an image model with --model",
                    param_hint="--render")
            if world.main:  # one process draws the images; the others wait, then name them
                records = figstep_records(records, out / "figstep")
                write_manifest(records, out / "figstep" / "manifest.jsonl")
            world.barrier()
            if not world.main:
                records = figstep_records(records, out / "figstep", write=False)
        judge, judge_name = load_judge(judge_model, world.device(device), trust_remote_code)

        # Under torchrun each rank answers its share of the prompts (every defence of a prompt
        # on one rank) into its own part file; rank 0 merges them into records.jsonl.
        by_id = {r["id"]: r for r in records}
        with distributed.Shard(world, [to_sample(r) for r in records], len(records), records_path,
                               resume, keys=lambda sample: [(d, sample.id) for d in names],
                               record_key=result_key) as job:
            with job.progress("eval", per_sample=len(names)) as advance:
                def show(result: dict) -> None:
                    advance(1)
                    if "error" in result:
                        stderr.print(f"error: {result['defence']}: {result['error']}")

                evaluate(casa, [by_id[s.id] for s in job.samples], names, job.path,
                         judge, DecodeOptions(max_new_tokens), threshold, truncate, resume, show)
            job.finish([])
        # Metrics come from the merged records, never from averages over ranks.
        results = collect(records_path, records, names) if world.main else []
        failed = world.sum({"failed": sum(1 for r in results if "error" in r)})["failed"]
    if world.main:
        source = (str(manifest) if manifest else str(benchmark) if benchmark
                  else ", ".join(set_names or []))
        metrics = summarise(results, casa, judge_name, threshold, prompt_source=source,
                            render=render, limit=limit, max_new_tokens=max_new_tokens)
        paths = write_outputs(metrics, out, title=f"casa eval: {casa.backbone.source}")
        if json:
            print_json(metrics)
        else:
            print_table(metrics["defences"])
        stderr.print(f"{len(results)} results ({failed} failed) -> {paths['markdown']}")
    if failed:
        raise typer.Exit(c.EXIT_PARTIAL)
