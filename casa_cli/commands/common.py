"""Options and helpers every command shares, so each command file only parses and prints."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from casa_cli.output import stderr

# Exit codes (documented in the README and in `casa --help`).
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_UNSAFE, EXIT_PARTIAL = 0, 1, 2, 3, 4

Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model directory or .gguf file \\[default: the embedded SmolLM2-135M-Instruct].")]
Adapter = Annotated[Optional[Path], typer.Option(
    "--adapter", "-a", help="CASA adapter directory \\[default: the shipped one for the default model].")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DeviceMap = Annotated[Optional[str], typer.Option(
    help="auto: spread a model too large for one GPU over all visible GPUs (accelerate); "
         "the safety head runs where the last layer lands. Overrides --device.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")]
Kernel = Annotated[str, typer.Option(help="Safety-attention backend: auto (Triton on CUDA), triton, torch.")]
TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow model code from the model directory (only for models you trust).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON (one object per line).")]

Prompt = Annotated[Optional[str], typer.Argument(help="The prompt, or - to read it from stdin.")]
Images = Annotated[Optional[list[Path]], typer.Option("--image", "-i", help="Image file (repeatable).")]
Audio = Annotated[Optional[list[Path]], typer.Option("--audio", help="Audio file (repeatable).")]
Manifest = Annotated[Optional[Path], typer.Option(
    help="JSONL with id, text, image/images, audio, label; paths relative to the file.")]
Folder = Annotated[Optional[Path], typer.Option(help="Folder of image/audio files, each paired with --prompt.")]
FolderPrompt = Annotated[Optional[str], typer.Option("--prompt", help="Prompt paired with each --folder file.")]
Output = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Write JSONL records here, flushed one by one.")]
Resume = Annotated[bool, typer.Option(help="Skip ids already in --output.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Prompts per forward pass (length-sorted).")]
Threshold = Annotated[Optional[float], typer.Option(
    min=0.0, max=1.0, help="p_unsafe at or above this is unsafe (casa) \\[default: the adapter's].")]
Truncate = Annotated[bool, typer.Option(help="Cut over-long text prompts to fit the context (warns).")]


def load_casa(model, adapter, device, dtype, kernel, trust_remote_code, device_map=None):
    from casa_cli.pipeline import load

    casa = load(model, adapter, device=device, dtype=dtype, kernel=kernel,
                trust_remote_code=trust_remote_code, device_map=device_map)
    if not casa.trained:
        stderr.print("note: this safety head is untrained (no trained adapter for this model): "
                     "verdicts are only the LM's own safe/unsafe log-odds. Train one with `casa train`.")
    return casa
