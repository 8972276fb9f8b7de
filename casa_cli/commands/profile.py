"""`casa profile`: where the time goes under each defence, and each one's overhead over none."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from casa_cli.commands import common as c
from casa_cli.output import print_json, progress

def command(
    defenses: Annotated[str, typer.Option(
        help="Comma list of none, casa, coca, prompt, vsfa, guard (an external guard: the same "
             "model prompted as a Llama Guard-style classifier). none always runs: every ratio "
             "is against it.")] = "none,casa,coca,prompt,guard",
    prompt_tokens: Annotated[str, typer.Option(
        help="Comma list of prompt lengths in tokens, as the model sees them (chat template "
             "and media included).")] = "128,1024",
    batch: Annotated[str, typer.Option(help="Comma list of batch sizes.")] = "1,8",
    new_tokens: Annotated[int, typer.Option(
        min=2, help="Tokens decoded per run (end tokens ignored, so every run does the same work).")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="Measured runs per defence and grid point.")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="Unmeasured runs first.")] = 1,
    image: c.Images = None, audio: c.Audio = None,
    guard_prompt: Annotated[Optional[str], typer.Option(
        help="guard: its classification prompt, with {prompt} where the user's prompt goes "
             "\\[default: Llama Guard 3's, categories abridged].")] = None,
    monitor: Annotated[bool, typer.Option(
        "--monitor", help="Also time each defence's decode with the response monitor checking "
                          "every token (the adapter's head and threshold), and report its cost per "
                          "token. Here it checks but never stops an answer, so every run decodes "
                          "all --new-tokens; it follows one row of a batch.")] = False,
    chart: Annotated[Optional[Path], typer.Option(
        help="Write a PNG: ms per stage (prefill, safety step, decode) for each defence.")] = None,
    trace: Annotated[Optional[Path], typer.Option(
        help="Write a torch.profiler Chrome trace of one run of each defence into this folder "
             "(opens in Perfetto).")] = None,
    model: c.Model = None, adapter: c.Adapter = None, device: c.Device = "auto",
    dtype: c.Dtype = "auto", kernel: c.Kernel = "auto",
    trust_remote_code: c.TrustRemoteCode = False, json: c.Json = False,
) -> None:
    """Time each defence end to end: prefill, the safety step, first token, decode rate, memory, and each defence's cost as a ratio to none from the same run.

    Synthetic prompts of exact token lengths; warm-ups, repeats, medians with \\[min-max] spread; load time and input preparation too. With --monitor, also the response monitor's cost per decoded token, from the same rounds.

    [bold]Examples[/bold]

      casa profile
      casa profile --defenses none,casa,coca,prompt,guard --prompt-tokens 128,512 --batch 1 --json
      casa profile --model ./Qwen2-VL-2B-Instruct --image cat.png --prompt-tokens 1024 --chart cost.png
      casa profile --prompt-tokens 512 --batch 1 --repeats 1 --trace traces/
      casa profile --defenses none,casa --prompt-tokens 128,512 --batch 1 --monitor
    """
    from casa_cli import profiling
    from casa_cli.report import plot_costs, print_costs

    grid = profiling.Grid(defenses=tuple(split(defenses, str, "--defenses")),
                          prompt_tokens=tuple(split(prompt_tokens, int, "--prompt-tokens")),
                          batches=tuple(split(batch, int, "--batch")), new_tokens=new_tokens,
                          repeats=repeats, warmup=warmup, images=tuple(image or ()),
                          audio=tuple(audio or ()),
                          guard_prompt=guard_prompt or profiling.GUARD_PROMPT, monitor=monitor)
    casa, load_ms = profiling.load_timed(model=model, adapter=adapter, device=device, dtype=dtype,
                                         kernel=kernel, trust_remote_code=trust_remote_code)
    if "casa" in grid.defenses and not casa.trained:
        c.note_untrained("its timings are what a trained one costs")
    with progress(grid.runs, "profile") as advance:
        report = profiling.profile(casa, grid, load_ms, trace, on_run=advance)
    if chart is not None:
        report["chart"] = str(plot_costs(report, chart))
    if json:
        print_json(report)
        return
    print_costs(report)


def split(value: str, kind, option: str) -> list:
    try:
        items = [kind(item) for item in c.comma_list(value)]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma list of {kind.__name__}s",
                                 param_hint=option) from None
    if not items:
        raise typer.BadParameter("give at least one value", param_hint=option)
    return items
