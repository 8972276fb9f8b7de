"""`casa generate`: answer prompts under a defence (casa, coca, prompt, vsfa, none)."""
from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from casa_cli.chat import gather_chat
from casa_cli.commands import common as c
from casa_cli.output import print_json, stderr


def command(
    prompt: c.Prompt = None, image: c.Images = None, audio: c.Audio = None,
    manifest: c.Manifest = None, folder: c.Folder = None, folder_prompt: c.FolderPrompt = None,
    messages: c.Messages = None,
    defense: Annotated[Optional[str], typer.Option(
        help="casa, coca, prompt, vsfa or none \\[default: casa with a trained adapter, vsfa "
             "with a VSFA adapter, else none].")] = None,
    on_unsafe: Annotated[Optional[str], typer.Option(
        help="casa: refuse (the adapter's refusal text) or generate (the model answers after "
             "the verdict) \\[default: generate for LoRA adapters, refuse for head-only ones].")] = None,
    threshold: c.Threshold = None, monitor: c.Monitor = False, monitor_every: c.MonitorEvery = None,
    monitor_threshold: c.MonitorThreshold = None, on_flag: c.OnFlag = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to write.")] = 256,
    temperature: Annotated[float, c.Finite(min=0.0, help="0 decodes greedily; above 0 samples.")] = 0.0,
    top_p: Annotated[float, c.Finite(
        positive=True, max=1.0, help="Nucleus sampling mass, in (0, 1] (with --temperature).")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    principle: Annotated[Optional[str], typer.Option(
        help="coca: the safety principle put before the user's turn \\[default: built in].")] = None,
    alpha: Annotated[float, c.Finite(help="coca: weight of (l_P - l_0).")] = 1.0,
    system_prompt: Annotated[Optional[str], typer.Option(
        help="prompt: the safety system prompt \\[default: the adapter's, else built in].")] = None,
    show_verdict: Annotated[bool, typer.Option(help="casa: print the verdict and p_unsafe on stderr.")] = False,
    model: c.Model = None, adapter: c.Adapter = None, device: c.Device = "auto",
    device_map: c.DeviceMap = None, dtype: c.Dtype = "auto", kernel: c.Kernel = "auto",
    trust_remote_code: c.TrustRemoteCode = False, truncate: c.Truncate = False,
    max_audio_seconds: c.MaxAudioSeconds = None, output: c.Output = None, resume: c.Resume = False,
    json: c.Json = False,
) -> None:
    """Answer prompts with a defence; the text streams to the terminal as it is written.

    [bold]Examples[/bold]

      casa generate "How do I pick a lock?"
      casa generate "How do I pick a lock?" --defense coca --alpha 1.5 --json
      casa generate "What is in this picture?" --image cat.png --model ./Qwen2-VL-2B-Instruct
      casa generate "And then?" --messages chat.json --show-verdict
      casa generate --manifest prompts.jsonl --defense none --output answers.jsonl --resume
      casa generate "How do I make thermite?" --defense none --monitor --on-flag cut --json

    Exit codes: 0 done; 1 runtime error; 2 usage error; 4 some records failed (as error records).
    """
    from casa_cli.decoding import DEFENSES, ON_UNSAFE, DecodeOptions
    from casa_cli.recipes import generate_records

    c.check_choice(defense, DEFENSES, "--defense")
    c.check_choice(on_unsafe, ON_UNSAFE, "--on-unsafe")
    watch = c.monitor_options(monitor, monitor_every, monitor_threshold, on_flag)
    c.check_output(output, manifest, folder, messages, *(image or []), *(audio or []), resume=resume)
    samples, total = gather_chat(messages, prompt, image or [], audio or [], manifest, folder, folder_prompt)

    def note(casa, chosen: str) -> None:
        if defense is None and chosen == "none":
            c.note_untrained("generating with --defense none, the plain model without a safety "
                             "layer (--defense coca or prompt need no adapter)")
        elif chosen == "casa":
            c.note_if_untrained(casa)

    # Text streams to a terminal as it is decoded; records (JSON, --output) come whole, counted by a bar.
    stream = total == 1 and not (json or output) and sys.stdout.isatty()
    records = generate_records(
        samples, total, output, resume, model, adapter, defense, device, device_map, dtype, kernel,
        trust_remote_code, max_audio_seconds, progress=json or output is not None, on_loaded=note,
        on_unsafe=on_unsafe, options=DecodeOptions(max_new_tokens, temperature, top_p, seed),
        threshold=threshold, principle=principle, alpha=alpha, system_prompt=system_prompt, monitor=watch,
        truncate=truncate, on_text=(lambda piece: print(piece, end="", flush=True)) if stream else None)
    failed = written = 0
    for written, record in enumerate(records, 1):
        failed += c.show_error(record)
        if json and not output:
            print_json(record)
        elif not output and "error" not in record:
            show_text(record, total != 1, stream, show_verdict)
            c.note_monitor_stop(record, watch, shown=stream)
    if output:
        stderr.print(f"{written} records ({failed} failed) -> {output}")
    if failed:
        raise typer.Exit(c.EXIT_PARTIAL)


def show_text(record: dict, several: bool, streamed: bool, show_verdict: bool) -> None:
    if several:
        print(f"### {record['id']}")
    print("" if streamed else record["text"], flush=True)
    if show_verdict and "verdict" in record:
        refused = " (refusal text)" if record["refused"] else ""
        stderr.print(f"{record['id']}: {record['verdict']}, p_unsafe {record['p_unsafe']:.4f}{refused}")
