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
    threshold: c.Threshold = None, monitor: c.Monitor = False, monitor_every: c.MonitorEvery = None,
    monitor_threshold: c.MonitorThreshold = None, on_flag: c.OnFlag = None,
    judge_model: Annotated[Optional[Path], typer.Option(
        help="Judge refusals with this local instruct/guard model \\[default: the phrase judge].")] = None,
    model: c.Model = None, adapter: c.Adapter = None, device: c.Device = "auto",
    device_map: c.DeviceMap = None, dtype: c.Dtype = "auto", kernel: c.Kernel = "auto",
    trust_remote_code: c.TrustRemoteCode = False, truncate: c.Truncate = False,
    max_audio_seconds: c.MaxAudioSeconds = None,
    resume: Annotated[bool, typer.Option(
        help="Keep DIR/records.jsonl and skip the (defence, id) pairs it already answers "
             "(failed ones are retried).")] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Answer labelled prompts under each defence, judge each answer refused or not, and report attack success, over-refusal and CASA's detection metrics.

    Writes to --out: records.jsonl (one result per defence and prompt, flushed), report.md, roc.png, tradeoff.png and metrics.json; with --render figstep also figstep/ (the images and a manifest of them). With --monitor every defence's answers are decoded under the response monitor: an answer it replaces by the refusal text counts as refused (one it cuts is judged on what is left), and each record carries its monitor fields.

    [bold]Examples[/bold]

      casa eval --set harmbench --set rho_overrefusal --limit 50 --out eval/
      casa eval --benchmark MM-SafetyBench/data --model ./Qwen2-VL-2B-Instruct --out mmsb/
      casa eval --set advbench --render figstep --model ./Qwen2-VL-2B-Instruct --out figstep/
      casa eval --manifest mine.jsonl --defenses none,casa --out eval/ --resume --json
      casa eval --set harmbench --set rho_overrefusal --defenses none,casa --monitor --out eval/
      torchrun --nproc-per-node 4 -m casa_cli eval --set harmbench --out eval/

    Exit codes: 0 done; 1 runtime error; 2 usage error or malformed benchmark; 4 some prompts failed (error records are in records.jsonl)."""
    from casa_cli.decoding import DEFENSES
    from casa_cli.evaluation import RENDERERS, NotAnImageModel, evaluate
    from casa_cli.report import print_table

    names = c.comma_list(defenses)
    if not names or len(set(names)) != len(names) or not set(names) <= set(DEFENSES):
        raise typer.BadParameter(f"{defenses!r}: give distinct names from {', '.join(DEFENSES)}",
                                 param_hint="--defenses")
    c.check_choice(render, RENDERERS, "--render")
    if format is not None and benchmark is None:
        raise typer.BadParameter("--format goes with --benchmark", param_hint="--format")
    c.check_output(out / "records.jsonl", manifest, benchmark)
    watch = c.monitor_options(monitor, monitor_every, monitor_threshold, on_flag)

    def show(result: dict) -> None:
        if "error" in result:
            stderr.print(f"error: {result['defence']}: {result['error']}")

    try:
        report = evaluate(out, model, adapter, manifest=manifest, benchmark=benchmark, format=format,
                          sets=set_names or [], limit=limit, defences=names, render=render,
                          max_new_tokens=max_new_tokens, threshold=threshold, judge_model=judge_model,
                          device=device, device_map=device_map, dtype=dtype, kernel=kernel,
                          trust_remote_code=trust_remote_code, truncate=truncate,
                          max_audio_seconds=max_audio_seconds, resume=resume, monitor=watch,
                          on_loaded=c.note_if_untrained, on_result=show)
    except NotAnImageModel as err:
        raise typer.BadParameter(str(err), param_hint="--render") from None
    if report.metrics is not None:  # rank 0 (under torchrun, the others only count failures)
        if json:
            print_json(report.metrics)
        else:
            print_table(report.metrics["defences"])
        stderr.print(f"{report.results} results ({report.failed} failed) -> {report.paths['markdown']}")
    if report.failed:
        raise typer.Exit(c.EXIT_PARTIAL)
