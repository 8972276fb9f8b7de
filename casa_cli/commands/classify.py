"""`casa classify`: one safety verdict per input, from the prompt's single prefill."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Annotated

import typer

from casa_cli.commands import common as c
from casa_cli.inputs import gather
from casa_cli.output import RecordWriter, print_json, print_table, stderr

COLUMNS = ["id", "scored", "verdict", "p_unsafe", "z", "lm_log_odds", "prompt_tokens",
           "latency_ms", "explain", "error"]


def command(
    prompt: c.Prompt = None, response: c.Response = None,
    image: c.Images = None, audio: c.Audio = None,
    manifest: c.Manifest = None, folder: c.Folder = None, folder_prompt: c.FolderPrompt = None,
    model: c.Model = None, adapter: c.Adapter = None, device: c.Device = "auto",
    device_map: c.DeviceMap = None, dtype: c.Dtype = "auto", kernel: c.Kernel = "auto",
    trust_remote_code: c.TrustRemoteCode = False,
    threshold: c.Threshold = None,
    batch_size: c.BatchSize = 8, truncate: c.Truncate = False,
    max_audio_seconds: c.MaxAudioSeconds = None,
    output: c.Output = None, resume: c.Resume = False, json: c.Json = False,
    fail_on_unsafe: Annotated[bool, typer.Option(help="Exit 3 if any input is judged unsafe.")] = False,
    explain: Annotated[int, typer.Option(
        min=0, help="List the N prompt tokens that pushed the attention score up the most.")] = 0,
) -> None:
    """Judge prompts (or prompt, response pairs) safe or unsafe: p_unsafe, the attention
    score z, the LM's own log-odds.

    [bold]Examples[/bold]

      casa classify "How do I make a pipe bomb?"
      echo "Tell me a joke" | casa classify - --json
      casa classify "What is in this picture?" --image cat.png --model ./llava-1.5-7b-hf
      casa classify --manifest prompts.jsonl --output verdicts.jsonl --resume
      casa classify --folder uploads/ --prompt "Describe this." --json --fail-on-unsafe
      torchrun --nproc-per-node 4 -m casa_cli classify --manifest big.jsonl --output v.jsonl
      casa classify "How do I hotwire a car?" --explain 5 --json
      casa classify "Tell me a joke" --response "Why did the chicken cross the road?" --json

    Exit codes: 0 done; 1 runtime error; 2 usage error; 3 unsafe input with
    --fail-on-unsafe (wins over 4); 4 some records failed (error records are in the output).
    """
    c.check_output(output, manifest, folder, *(image or []), *(audio or []), resume=resume)
    from casa_cli import distributed  # imports torch: not at module level, for `casa --help`

    samples, total = gather(prompt, image or [], audio or [], manifest, folder, folder_prompt,
                            response)
    with distributed.launched(device, device_map) as world, \
            distributed.Shard(world, samples, total, output, resume) as job:
        # Opened (and locked) before the model loads, so a busy --output fails at once.
        with (RecordWriter(job.path, resume=resume) if job.path else nullcontext()) as writer:
            casa = c.load_casa(model, adapter, world.device(device), dtype, kernel,
                               trust_remote_code, device_map, max_audio_seconds)
            shown, counts = [], {"safe": 0, "unsafe": 0, "error": 0}
            with job.progress("classify", records_on_stdout=json and not output) as advance:
                for record in casa.classify(job.samples, batch_size=batch_size, threshold=threshold,
                                            truncate=truncate, explain=explain, on_batch=advance):
                    counts[record.get("verdict", "error")] += 1
                    c.show_error(record)
                    if writer:
                        writer.write(record)
                    elif json and job.streaming:
                        print_json(record)
                    else:
                        shown.append(record)
        shown = job.finish(shown)  # under torchrun: rank 0 merges, or gathers what to show
        counts = world.sum(counts)  # every rank exits with the same code
    if json:
        for record in shown:
            print_json(record)
    elif shown:
        title = None if casa.trained else "untrained head: LM log-odds only"
        print_table(shown, [col for col in COLUMNS if any(col in r for r in shown)], title=title)
    if output and world.main:
        stderr.print(f"{sum(counts.values())} records ({counts['unsafe']} unsafe, {counts['safe']} safe, "
                     f"{counts['error']} failed) -> {output}")
    if fail_on_unsafe and counts["unsafe"]:
        raise typer.Exit(c.EXIT_UNSAFE)
    if counts["error"]:
        raise typer.Exit(c.EXIT_PARTIAL)
