"""`casa generate`: answer prompts under a defence (casa, coca, prompt, vsfa, none)."""
from __future__ import annotations

import json as jsonlib
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from casa_cli.commands import common as c
from casa_cli.inputs import InputError, Sample, gather, prompt_sample
from casa_cli.output import RecordWriter, done_ids, print_json, progress, stderr

ROLES = ("system", "user", "assistant")


def command(
    prompt: c.Prompt = None, image: c.Images = None, audio: c.Audio = None,
    manifest: c.Manifest = None, folder: c.Folder = None, folder_prompt: c.FolderPrompt = None,
    messages: Annotated[Optional[Path], typer.Option(
        help="Chat history: a JSON list of {role, content}. PROMPT is appended as the last "
             "user turn; without PROMPT the file's last (user) turn is the prompt.")] = None,
    defense: Annotated[Optional[str], typer.Option(
        help="casa, coca, prompt, vsfa or none \\[default: casa with a trained adapter, vsfa "
             "with a VSFA adapter, else none].")] = None,
    on_unsafe: Annotated[Optional[str], typer.Option(
        help="casa: refuse (the adapter's refusal text) or generate (the model answers after "
             "the verdict) \\[default: generate for LoRA adapters, refuse for head-only ones].")] = None,
    threshold: c.Threshold = None,
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
    show_verdict: Annotated[bool, typer.Option(
        help="casa: print the verdict and p_unsafe on stderr.")] = False,
    model: c.Model = None, adapter: c.Adapter = None, device: c.Device = "auto",
    device_map: c.DeviceMap = None,
    dtype: c.Dtype = "auto", kernel: c.Kernel = "auto",
    trust_remote_code: c.TrustRemoteCode = False, truncate: c.Truncate = False,
    max_audio_seconds: c.MaxAudioSeconds = None,
    output: c.Output = None, resume: c.Resume = False, json: c.Json = False,
) -> None:
    """Answer prompts with a defence; the text streams to the terminal as it is written.

    [bold]Examples[/bold]

      casa generate "How do I pick a lock?"
      casa generate "How do I pick a lock?" --defense coca --alpha 1.5 --json
      casa generate "What is in this picture?" --image cat.png --model ./Qwen2-VL-2B-Instruct
      casa generate "And then?" --messages chat.json --show-verdict
      casa generate --manifest prompts.jsonl --defense none --output answers.jsonl --resume

    Exit codes: 0 done; 1 runtime error; 2 usage error; 4 some records failed (error records
    are in the output).
    """
    from casa_cli.decoding import DEFENSES, ON_UNSAFE, DecodeOptions, check_defense

    for name, value, choices in (("--defense", defense, DEFENSES), ("--on-unsafe", on_unsafe, ON_UNSAFE)):
        if value is not None and value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=name)
    if resume and output is None:
        raise typer.BadParameter("--resume needs --output FILE", param_hint="--resume")
    c.check_output(output, manifest, folder, messages, *(image or []), *(audio or []))
    decode_options = DecodeOptions(max_new_tokens, temperature, top_p, seed)
    if messages is not None:
        samples, total = iter([chat_sample(messages, prompt, image or [], audio or [],
                                           manifest or folder)]), 1
    else:
        samples, total = gather(prompt, image or [], audio or [], manifest, folder, folder_prompt)

    # Opened (and locked) before --resume reads it and before the model loads.
    with (RecordWriter(output, resume=resume) if output else nullcontext()) as writer:
        skip = done_ids(output) if resume and output else set()
        if skip:
            samples = (s for s in samples if s.id not in skip)
            total = None if total is None else max(total - len(skip), 0)
        casa = c.load_casa(model, adapter, device, dtype, kernel, trust_remote_code, device_map,
                           max_audio_seconds=max_audio_seconds, note=False)
        defense = pick_defense(casa, defense)
        check_defense(casa, defense)  # once, before any record, rather than once per record

        # Text streams to a terminal as it is decoded; records (JSON, --output) come whole.
        stream = total == 1 and not (json or output) and sys.stdout.isatty()
        options = {"on_unsafe": on_unsafe, "options": decode_options, "threshold": threshold,
                   "principle": principle, "alpha": alpha, "system_prompt": system_prompt,
                   "truncate": truncate, "on_text": write_piece if stream else None}
        failed = written = 0
        # A bar counts whole records (JSON, --output); streamed or printed text needs none.
        bar = (progress(total, "generate", records_on_stdout=not output) if json or output
               else nullcontext(lambda n=1: None))
        with bar as advance:
            for record in casa.generate(samples, defense, **options):
                advance(1)
                if "error" in record:
                    failed += 1
                    stderr.print(f"error: {record['error']}")
                if writer:
                    writer.write(record)
                elif json:
                    print_json(record)
                elif "error" not in record:
                    show_text(record, total != 1, stream, show_verdict)
                written += 1
    if writer:
        stderr.print(f"{written} records ({failed} failed) -> {output}")
    if failed:
        raise typer.Exit(c.EXIT_PARTIAL)


def pick_defense(casa, defense: str | None) -> str:
    """--defense, or the adapter's default; a note on stderr when the defence would run on
    an untrained safety head, or falls back to none for want of a trained one."""
    if defense is None and casa.config.mode == "vsfa":
        return "vsfa"  # its safety is in the merged LoRA weights, not in a head
    if defense is None and not casa.trained:
        c.note_untrained("generating with --defense none, the plain model without a safety "
                         "layer (--defense coca or prompt need no adapter)")
        return "none"
    if defense == "casa" and not casa.trained:
        c.note_untrained()
    return defense or "casa"


def write_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def show_text(record: dict, several: bool, streamed: bool, show_verdict: bool) -> None:
    if several:
        sys.stdout.write(f"### {record['id']}\n")
    sys.stdout.write(("" if streamed else record["text"]) + "\n")
    sys.stdout.flush()
    if show_verdict and "verdict" in record:
        refused = " (refusal text)" if record["refused"] else ""
        stderr.print(f"{record['id']}: {record['verdict']}, p_unsafe {record['p_unsafe']:.4f}{refused}")


def chat_sample(path: Path, prompt: str | None, images, audio, other_source) -> Sample:
    """One sample from a chat history file, with PROMPT as the last user turn (or the
    file's own last turn, which must then be the user's)."""
    if other_source is not None:
        raise InputError("--messages goes with a PROMPT (or alone), not with --manifest or --folder")
    history = read_history(path)
    if prompt is None:
        if not history or history[-1]["role"] != "user":
            raise InputError(f"{path}: the last message must be the user's turn (or give a PROMPT)")
        prompt, history = history[-1]["content"], history[:-1]
    sample = prompt_sample(prompt, images, audio)
    sample.messages = history + sample.messages
    return sample


def read_history(path: Path) -> list[dict]:
    try:
        data = jsonlib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (jsonlib.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: invalid JSON ({getattr(err, 'msg', err)})") from None
    if not isinstance(data, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in data):
        raise InputError(f"{path}: expected a JSON list of {{\"role\": system|user|assistant, "
                         "\"content\": text}}")
    return [{"role": m["role"], "content": m["content"]} for m in data]
