"""Options and helpers every command shares, so each command file only parses and prints."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Iterable, Optional, Sequence

import typer

from casa_cli.output import check_writable, refuse_overwrite, stderr

# Exit codes (documented in the README and in `casa --help`).
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_UNSAFE, EXIT_PARTIAL = 0, 1, 2, 3, 4


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def _positive(value: float | None) -> float | None:
    if _finite(value) is not None and value <= 0:
        raise typer.BadParameter(f"must be more than 0, got {value}")
    return value


def Finite(*param_decls: str, positive: bool = False, **options):
    """A float option that refuses NaN and infinities, naming the option (exit 2): float()
    parses "nan" and "inf", and NaN passes every `min`/`max` check, since it compares false.
    `positive` also refuses 0 and below. Other typer.Option arguments pass through."""
    return typer.Option(*param_decls, callback=_positive if positive else _finite, **options)


def comma_list(value: str) -> list[str]:
    """The items of an option such as `--defenses none,casa`, stripped; empty ones dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_layer(value: str | None) -> int | str | None:
    """`casa train --layer`: "auto", "last" (None: the final norm) or a layer number from 1."""
    value = (value or "auto").strip().lower()
    if value in ("auto", "last"):
        return None if value == "last" else value
    if not value.isdigit() or int(value) < 1:
        raise typer.BadParameter(f"use auto, last or a layer number from 1, not {value!r}")
    return int(value)


def parse_layers(value: str | None) -> list[int] | None:
    """`casa train --layers 9,12,15`: the candidate layers of --layer auto."""
    if value is None:
        return None
    parts = comma_list(value)
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise typer.BadParameter(f"use layer numbers from 1 separated by commas, not {value!r}")
    return sorted({int(p) for p in parts})


Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model directory or .gguf file \\[default: the embedded SmolLM2-135M-Instruct].")]
Adapter = Annotated[Optional[Path], typer.Option(
    "--adapter", "-a", help="CASA adapter directory, or the name of a shipped one (`casa load` lists "
                            "them) \\[default: the shipped one for the default model].")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DeviceMap = Annotated[Optional[str], typer.Option(
    help="auto: spread a model too large for one GPU over all visible GPUs (accelerate); "
         "the safety head runs where the last layer lands. Overrides --device.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")]
Kernel = Annotated[str, typer.Option(help="Safety-attention backend: auto (Triton on CUDA), triton, torch.")]
TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow model code from the model directory (only for models you trust).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON (one object per line).")]

Prompt = Annotated[Optional[str], typer.Argument(help="The prompt, or - to read it from stdin.")]
Messages = Annotated[Optional[Path], typer.Option(
    help="Chat history: a JSON list of {role, content}. PROMPT is appended as the last "
         "user turn; without PROMPT the file's last (user) turn is the prompt.")]
Images = Annotated[Optional[list[Path]], typer.Option("--image", "-i", help="Image file (repeatable).")]
Audio = Annotated[Optional[list[Path]], typer.Option("--audio", help="Audio file (repeatable).")]
Manifest = Annotated[Optional[Path], typer.Option(
    help="JSONL with id, text, image/images, audio, label; paths relative to the file.")]
Folder = Annotated[Optional[Path], typer.Option(help="Folder of image/audio files, each paired with --prompt.")]
FolderPrompt = Annotated[Optional[str], typer.Option("--prompt", help="Prompt paired with each --folder file.")]
Output = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Write JSONL records here, flushed as each record (classify: each "
                           "batch) finishes; locked while written; never one of the inputs.")]
Resume = Annotated[bool, typer.Option(help="Skip ids already in --output.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Prompts per forward pass (length-sorted).")]
Threshold = Annotated[Optional[float], Finite(
    min=0.0, max=1.0, help="p_unsafe at or above this is unsafe (casa) \\[default: the adapter's].")]
Truncate = Annotated[bool, typer.Option(
    help="Cut the middle of over-long text prompts to fit the context, keeping their start and "
         "end; the record says \"truncated\": true.")]
MaxAudioSeconds = Annotated[Optional[float], Finite(
    "--max-audio-seconds", positive=True,
    help="Refuse longer audio clips (an error record) \\[default: the model's audio window, "
         "30 s for Whisper-style encoders].")]
Monitor = Annotated[bool, typer.Option(
    "--monitor", help="Watch the answer as it is written: the safety head over prompt + answer "
                      "so far, updated at every token, stops it when p_unsafe reaches the threshold.")]
MonitorEvery = Annotated[Optional[int], typer.Option(
    min=1, help="--monitor: check p_unsafe every N tokens and at the answer's end \\[default: 1].")]
MonitorThreshold = Annotated[Optional[float], Finite(
    min=0.0, max=1.0, help="--monitor: stop at p_unsafe at or above this \\[default: the adapter's].")]
OnFlag = Annotated[Optional[str], typer.Option(
    help="--monitor: refuse (the adapter's refusal text replaces the answer) or cut (keep the "
         "answer before the flagged token) \\[default: refuse].")]


def check_choice(value: str | None, choices: Sequence[str], option: str) -> None:
    """A usage error naming `option` (exit 2) for a value not among `choices`; None passes."""
    if value is not None and value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=option)


def check_output(output: Path | None, *inputs: Path | None, resume: bool = False) -> None:
    """Refuse an unusable --output up front (exit 2), before any input is read or any file
    opened for writing: one of this run's `inputs` (a folder counts its media files, what
    --folder reads), a folder, or a file another process is writing; and --resume without it."""
    if resume and output is None:
        raise typer.BadParameter("--resume needs --output FILE", param_hint="--resume")
    if output is None:
        return
    refuse_overwrite([output], _input_files(inputs))
    check_writable(output)


def _input_files(inputs: Iterable[Path | None]) -> list[Path]:
    from casa_cli.inputs import read_folder

    files = []
    for path in (Path(p) for p in inputs if p is not None):
        if path.is_dir():  # the media files --folder would read
            files += [media for sample in read_folder(path, "")
                      for media in sample.images + sample.audio]
        else:
            files.append(path)
    return files


def monitor_options(monitor: bool, every: int | None, threshold: float | None,
                    on_flag: str | None):
    """The --monitor options as `casa_cli.monitor.MonitorOptions` (None without --monitor,
    where the others are a usage error rather than silently ignored)."""
    from casa_cli.monitor import ON_FLAG, MonitorOptions

    check_choice(on_flag, ON_FLAG, "--on-flag")
    options = {"every": "--monitor-every", "threshold": "--monitor-threshold", "on_flag": "--on-flag"}
    given = {name: value for name, value in zip(options, (every, threshold, on_flag))
             if value is not None}
    if given and not monitor:
        raise typer.BadParameter("goes with --monitor", param_hint=options[next(iter(given))])
    return MonitorOptions(**given) if monitor else None


def note_monitor_stop(record: dict, options, shown: bool) -> None:
    """Say on stderr when the monitor (`options`, from `monitor_options`) stopped an answer
    that was `shown` as it was written, so that text on screen is never withdrawn silently."""
    stopped = record.get("monitor", {}).get("stopped_at")
    if not shown or stopped is None:
        return
    after = (f"the text above is withdrawn; the answer is the refusal text: {record['text']!r}"
             if options.on_flag == "refuse" else "the answer ends before that token")
    stderr.print(f"{record['id']}: answer stopped by the response monitor at token {stopped} "
                 f"(p_unsafe {record['monitor']['p_unsafe_max']:.4f}); {after}", markup=False)


def show_error(record: dict) -> bool:
    """Name a failed record's error on stderr; True when it failed (for counting)."""
    if "error" in record:
        stderr.print(f"error: {record['error']}")
    return "error" in record


def load_casa(model, adapter, device, dtype, kernel, trust_remote_code, device_map=None,
              max_audio_seconds=None):
    """casa_cli.pipeline.load with the commands' options, saying so on stderr when the
    safety head is untrained."""
    from casa_cli.pipeline import load

    casa = load(model, adapter, device=device, dtype=dtype, kernel=kernel,
                trust_remote_code=trust_remote_code, device_map=device_map,
                max_audio_seconds=max_audio_seconds)
    note_if_untrained(casa)
    return casa


def note_if_untrained(casa) -> None:
    """`note_untrained`, when the loaded `casa` has no trained adapter."""
    if not casa.trained:
        note_untrained()


def note_untrained(consequence: str = "verdicts are only the LM's own safe/unsafe log-odds") -> None:
    """The one note for a model without a trained adapter, ending in what that means for
    this command."""
    stderr.print(f"note: no trained adapter for this model, so the safety head is untrained: "
                 f"{consequence}. Train one with `casa train`.")


Response = Annotated[Optional[str], typer.Option(
    help="An answer to PROMPT: score the (prompt, response) pair, with the prompt head until a "
         "response head is trained (- reads it from stdin, when PROMPT is not -). A manifest "
         "line gives its own 'response'.")]
