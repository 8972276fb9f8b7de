"""End-to-end cost of each defence (docs/design.md §7), behind `casa profile` and
benchmarks/bench_end_to_end.py.

For every grid point (prompt length x batch) the same synthetic prompt, exactly that many
tokens long as the model sees it, runs under each defence through `Casa.generate`, so the
timings are the ones decoding records itself (prefill_ms, safety_ms, first_token_ms,
decode_tokens_per_s); no second decoder is involved. Around them this module measures what
decoding does not: load time, input preparation, the safety head alone on a captured `H`
(each backend the device has), peak memory, and an external-guard baseline.

- Repeats are interleaved (one run of every defence, then the next round), so a machine
  whose load drifts slows all defences alike, and each ratio to `none` is taken within one
  round (paired) before its median is reported.
- Every run decodes exactly `new_tokens` (end tokens ignored), so every defence does the
  same work after the prompt. A CASA verdict of `unsafe` decodes too (on_unsafe=generate):
  the cost measured is that of answering.
- `guard` is what a Llama Guard-style filter costs with the same backbone: the user's
  prompt wrapped in a classification prompt, prefilled, and a verdict of a few tokens
  decoded, before the plain model (`none`, the same round's run) answers. Its `safety_ms`
  is that whole guard call, beside CASA's head step on the prefill the model does anyway.
- `monitor` (`casa profile --monitor`): each defence's run is followed, in the same round,
  by the same decode under the response monitor checking every token (`WATCH`: it never
  stops the answer), and the monitor's cost per decode step is taken against that round's
  unmonitored run (`monitored`). The monitor follows one row (`Casa.generate`'s copies are
  copies of one prompt). `guard` answers with the plain model, so it shows `none`'s figures.
- With casa, each grid point also gets a row of what a verdict alone costs
  (casa_cli.verdict_cost): classify against a plain full forward, and a refusal against a
  full prefill, both stopping after the head's layer.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from casa_cli.decoding import DEFENSES, DecodeOptions
from casa_cli.guard import GUARD_PROMPT, GUARD_VERDICT_TOKENS, guard_sample
from casa_cli.head import kernel_available, verdict
from casa_cli.inputs import InputError, Sample, prompt_sample
from casa_cli.monitor import MonitorOptions
from casa_cli.pipeline import Casa, load, peak_rss_mb
from casa_cli.timing import Timer, device_name, stats
from casa_cli.verdict_cost import verdict_costs

PROFILED = ("none", *[d for d in DEFENSES if d != "none"], "guard")
DEFAULT_DEFENSES = ("none", "casa", "coca", "prompt", "guard")
# Ordinary prose: it tokenises like real prompts (no degenerate runs of one token).
FILLER = ("Rivers carry sand from the mountains down to the sea, and the sea returns it to "
          "the shore as beaches that shift with every storm and every season of the year. ")
HEAD_CALLS = 50  # the head alone takes microseconds: many calls give a stable median
# The monitor as `casa generate --monitor` runs it (every token checked against the
# adapter's threshold), except that no check stops the answer: it decodes all new tokens.
WATCH = MonitorOptions(every=1, stop=False)


@dataclass
class Grid:
    """What one profile measures. `none` always runs, first: every ratio is against it."""
    defenses: tuple[str, ...] = DEFAULT_DEFENSES
    prompt_tokens: tuple[int, ...] = (128, 1024)
    batches: tuple[int, ...] = (1, 8)
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 1
    images: tuple[Path, ...] = ()
    audio: tuple[Path, ...] = ()
    guard_prompt: str = GUARD_PROMPT  # {prompt} marks where the user's prompt goes
    monitor: bool = False  # also time each defence's decode under the response monitor

    def __post_init__(self):
        unknown = [d for d in self.defenses if d not in PROFILED]
        if unknown:
            raise InputError(f"unknown defense(s) {', '.join(unknown)}; expected some of "
                             f"{', '.join(PROFILED)}")
        self.defenses = ("none", *[d for d in dict.fromkeys(self.defenses) if d != "none"])
        if not self.prompt_tokens or min(self.prompt_tokens) < 1:
            raise InputError("prompt tokens must be at least 1")
        if not self.batches or min(self.batches) < 1:
            raise InputError("batch sizes must be at least 1")
        if self.new_tokens < 2:
            raise InputError("new tokens must be at least 2 (a decode rate needs two tokens)")
        if self.repeats < 1 or self.warmup < 0:
            raise InputError("repeats must be at least 1 and warm-ups at least 0")
        if "{prompt}" not in self.guard_prompt:
            raise InputError("the guard prompt needs {prompt} where the user's prompt goes")

    @property
    def runs(self) -> int:
        """Generation runs in all, for a progress bar."""
        per_round = sum(1 + self.watches(d) for d in self.defenses) + self.verdicts
        return len(self.prompt_tokens) * len(self.batches) * (self.warmup + self.repeats) * per_round

    @property
    def verdicts(self) -> bool:
        """With casa: also what a verdict alone costs (`verdict_cost`)."""
        return "casa" in self.defenses

    def watches(self, defense: str) -> bool:
        """`defense` is timed under the monitor too: with `monitor`, all but the guard (whose
        answer is the plain model's)."""
        return self.monitor and defense != "guard"


def load_timed(**options) -> tuple[Casa, float]:
    """`casa_cli.load(**options)` and its wall time in ms (model, processor and adapter)."""
    started = time.perf_counter()
    casa = load(**options)
    return casa, (time.perf_counter() - started) * 1000


def synthetic_sample(casa: Casa, tokens: int, images=(), audio=(), reserve: int = 1) -> Sample:
    """A prompt whose model input (chat template, special tokens and media included) is
    exactly `tokens` long: a prefix of FILLER, grown or cut until the count is right."""
    backbone, tokenizer = casa.backbone, casa.backbone.tokenizer
    per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    filler = tokenizer(FILLER * (tokens // per_filler + 2), add_special_tokens=False)["input_ids"]

    def build(n: int) -> Sample:
        return prompt_sample(tokenizer.decode(filler[:n]), images, audio,
                             sample_id=f"synthetic-{tokens}")

    def length(sample: Sample) -> int:
        return int(backbone.encode([sample], reserve=reserve)["input_ids"].shape[1])

    # The template, special tokens and media are a fixed overhead; decoding a prefix and
    # encoding it again can merge a token at the cut, so correct until the count is exact.
    n = tokens - length(build(1)) + 1
    tried = set()
    while 1 <= n <= len(filler) and n not in tried:
        tried.add(n)
        sample = build(n)
        got = length(sample)
        if got == tokens:
            return sample
        n += tokens - got
    raise InputError(f"cannot build a prompt of exactly {tokens} tokens for this model "
                     "(the chat template and media alone may be longer)")


def head_backends(device: torch.device) -> list[str]:
    """The PyTorch reference everywhere; the Triton kernel beside it on CUDA."""
    return ["triton", "torch"] if device.type == "cuda" and kernel_available() else ["torch"]


def measure_inputs(casa: Casa, sample: Sample, batch: int, grid: Grid) -> dict:
    """Input preparation (template, tokeniser, media, transfer) of a batch, and the safety
    head alone on that batch's captured `H`, per backend, in microseconds."""
    backbone, device = casa.backbone, casa.backbone.device
    prepare = []
    for _ in range(grid.warmup + grid.repeats):
        with Timer(device) as timer:
            inputs = backbone.encode([sample] * batch, reserve=grid.new_tokens + 1)
        prepare.append(timer.ms)
    prefill = backbone.prefill(inputs, layer=casa.config.layer)
    head_us = {}
    with torch.no_grad():
        for backend in head_backends(device):
            calls = []
            for _ in range(grid.warmup + 2 + HEAD_CALLS):  # the first calls compile/allocate
                with Timer(device) as timer:
                    casa.head(prefill.H, prefill.mask, backend=backend)
                calls.append(timer.ms * 1000)
            head_us[backend] = stats(calls[grid.warmup + 2:])
    measured = {"input_tokens": int(inputs["input_ids"].shape[1]),
                "prepare_ms": stats(prepare[grid.warmup:]), "safety_head_us": head_us}
    if grid.monitor:
        measured["monitor_us"] = measure_monitor(casa, prefill, grid)
    return measured


@torch.no_grad()
def measure_monitor(casa: Casa, prefill, grid: Grid) -> dict:
    """The response monitor's own work per decoded token, alone, in microseconds, on the
    last row of `prefill`: the capture hook's final norm of one position (below the last
    layer; at it the norm runs anyway), `SafetyHead.step` and the check (p_unsafe read back,
    the verdict), as `monitor.Monitor.advance` does them."""
    backbone = casa.backbone
    last = backbone.resolve_layer(casa.config.layer) == backbone.num_layers
    norm = (lambda h: h) if last else backbone.final_norm()
    head, threshold = casa.response_judge()
    state, h = head.attention_state(prefill.H[-1:], prefill.mask[-1:]), prefill.H[-1:, -1]
    calls = []
    for _ in range(grid.warmup + 2 + HEAD_CALLS):
        with Timer(backbone.device) as timer:
            state, out = head.step(state, norm(h))
            verdict(float(out.p_unsafe[0]), threshold)
        calls.append(timer.ms * 1000)
    return stats(calls[grid.warmup + 2:])


def run_defense(casa: Casa, defense: str, sample: Sample, batch: int, grid: Grid) -> dict:
    """One run: the timings decoding records (the guard's: its whole call, see `run_guard`)."""
    if defense == "guard":
        return run_guard(casa, guard_sample(sample, grid.guard_prompt), batch)
    options = DecodeOptions(max_new_tokens=grid.new_tokens, ignore_eos=True)
    answer = casa.generate(sample, defense, on_unsafe="generate", options=options, copies=batch)
    return {"input_tokens": answer.prompt_tokens, **answer.timings}


def run_monitored(casa: Casa, defense: str, sample: Sample, batch: int, grid: Grid) -> float:
    """The same decode as `run_defense`'s under the response monitor (`WATCH`), in ms per
    decode step. A monitored answer also feeds its last token, so that the token is checked:
    its `new_tokens` tokens take `new_tokens` steps after the first token, where an
    unmonitored answer takes one fewer (`monitored` counts that step apart)."""
    options = DecodeOptions(max_new_tokens=grid.new_tokens, ignore_eos=True)
    answer = casa.generate(sample, defense, on_unsafe="generate", options=options, copies=batch,
                           monitor=WATCH)
    steps = len(answer.tokens)
    if answer.monitor is None or answer.monitor["checks"] != steps or steps != grid.new_tokens:
        raise RuntimeError(f"the monitored {defense} run decoded {steps} of {grid.new_tokens} "
                           f"tokens with {answer.monitor and answer.monitor['checks']} checks")
    return 1000 * (steps - 1) / answer.timings["decode_tokens_per_s"] / steps


def monitored(run: dict, steps: int) -> dict:
    """The monitor's cost in `run` (its `monitor_decode_ms_per_token` from `run_monitored`
    beside its own unmonitored decode): ms and % of a decode step, and % of the whole decode
    of an answer of `steps` tokens, the monitored answer's extra last step included."""
    plain, watched = run["decode_ms_per_token"], run["monitor_decode_ms_per_token"]
    return {"monitor_ms_per_token": watched - plain,
            "monitor_pct_of_decode_step": 100 * (watched - plain) / plain,
            "monitor_pct_of_answer_decode": 100 * (watched * steps / (plain * (steps - 1)) - 1)}


def run_guard(casa: Casa, guarded: Sample, batch: int) -> dict:
    """The external guard's verdict on `batch` prompts (`guarded`: the guard prompt around
    the user's): its prefill plus GUARD_VERDICT_TOKENS decoded, timed whole (its input
    preparation included)."""
    options = DecodeOptions(max_new_tokens=GUARD_VERDICT_TOKENS, ignore_eos=True)
    with Timer(casa.backbone.device) as timer:
        verdict = casa.generate(guarded, "none", options=options, copies=batch)
    return {"safety_ms": timer.ms, "guard_prompt_tokens": verdict.prompt_tokens,
            "guard_prefill_ms": verdict.timings["prefill_ms"]}


def with_ratios(run: dict, plain: dict, new_tokens: int) -> dict:
    """Derived per-run figures, against the `none` run of the same round (the monitor's:
    against the defence's own unmonitored run)."""
    run = dict(run)
    if "prefill_ms" not in run:  # the guard: the plain model answers after its verdict
        run.update(input_tokens=plain["input_tokens"], prefill_ms=plain["prefill_ms"],
                   first_token_ms=run["safety_ms"] + plain["first_token_ms"],
                   decode_tokens_per_s=plain["decode_tokens_per_s"])
        if "monitor_decode_ms_per_token" in plain:
            run["monitor_decode_ms_per_token"] = plain["monitor_decode_ms_per_token"]
        if "peak_gpu_mb" in plain:
            run["peak_gpu_mb"] = max(run["peak_gpu_mb"], plain["peak_gpu_mb"])
    run["decode_ms_per_token"] = 1000 / run["decode_tokens_per_s"]
    run["prefill_ratio"] = run["prefill_ms"] / plain["prefill_ms"]
    run["first_token_ratio"] = run["first_token_ms"] / plain["first_token_ms"]
    run["decode_cost_ratio"] = plain["decode_tokens_per_s"] / run["decode_tokens_per_s"]
    if "safety_ms" in run:
        run["safety_pct_of_prefill"] = 100 * run["safety_ms"] / run["prefill_ms"]
    if "monitor_decode_ms_per_token" in run:
        run.update(monitored(run, new_tokens))
    return run


def measure_defenses(casa: Casa, sample: Sample, tokens: int, batch: int, grid: Grid,
                     on_run: Callable[[], None]) -> list[dict]:
    """One row per defence: each figure's median and range over the repeats."""
    device = casa.backbone.device
    runs: dict[str, list[dict]] = {d: [] for d in grid.defenses}
    for round_ in range(grid.warmup + grid.repeats):
        measured = {}
        for defense in grid.defenses:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            measured[defense] = run_defense(casa, defense, sample, batch, grid)
            if device.type == "cuda":
                measured[defense]["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            on_run()
            if grid.watches(defense):
                measured[defense]["monitor_decode_ms_per_token"] = run_monitored(
                    casa, defense, sample, batch, grid)
                on_run()
        if round_ < grid.warmup:
            continue
        plain = measured["none"]
        for defense, run in measured.items():
            runs[defense].append(with_ratios(run, plain, grid.new_tokens))
        if "guard" in measured and "casa" in measured:  # what CASA's verdict saves
            guard, casa_run = measured["guard"], measured["casa"]
            runs["guard"][-1]["guard_vs_casa"] = guard["safety_ms"] / casa_run["safety_ms"]
    rows = []
    for defense, done in runs.items():
        row = {"defence": defense, "prompt_tokens": tokens, "batch": batch}
        for key in done[0]:
            values = [run[key] for run in done]
            # Token counts are the same in every run; timings get their median and range.
            row[key] = values[0] if key.endswith("_tokens") else stats(values)
        rows.append(row)
    return rows


def write_trace(casa: Casa, sample: Sample, batch: int, grid: Grid, directory: Path) -> Path:
    """One run of every defence under torch.profiler, as a Chrome trace (opens in Perfetto
    or chrome://tracing); each defence is a labelled range."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU]
    if casa.backbone.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as profiler:
        for defense in grid.defenses:
            with record_function(f"casa:{defense}"):
                run_defense(casa, defense, sample, batch, grid)
            if grid.watches(defense):
                with record_function(f"casa:{defense}:monitor"):
                    run_monitored(casa, defense, sample, batch, grid)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"casa-profile-{sample.id}-batch{batch}.json"
    profiler.export_chrome_trace(str(path))
    return path


def environment(casa: Casa, load_ms: float) -> dict:
    backbone = casa.backbone
    return {"model": backbone.source, "family": backbone.family,
            "adapter": casa.adapter_name,
            "adapter_trained": casa.trained, "device": str(backbone.device),
            "device_name": device_name(backbone.device),
            "dtype": str(backbone.dtype).replace("torch.", ""), "head_backend": casa.backend,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_ms": round(load_ms, 3)}


def profile(casa: Casa, grid: Grid, load_ms: float, trace_dir: Path | None = None,
            on_run: Callable[[], None] = lambda: None) -> dict:
    """Measure `grid` on `casa`: the environment, one record per grid point (`inputs`), one
    row per grid point and defence (`rows`), with casa one row per grid point of what a
    verdict alone costs (`verdicts`), and the trace file's path with `trace_dir`.
    The load average before and after says how busy the machine was meanwhile."""
    report = environment(casa, load_ms)
    report.update(new_tokens=grid.new_tokens, repeats=grid.repeats, warmup=grid.warmup,
                  monitor={"every": WATCH.every, "threshold": casa.response_judge()[1],
                           "stops": WATCH.stop} if grid.monitor else None,
                  load_average_start=[round(x, 2) for x in os.getloadavg()])
    inputs, rows, verdicts = [], [], []
    reserve = grid.new_tokens + 1
    for tokens in grid.prompt_tokens:
        sample = synthetic_sample(casa, tokens, grid.images, grid.audio, reserve)
        for batch in grid.batches:
            inputs.append({"prompt_tokens": tokens, "batch": batch,
                           **measure_inputs(casa, sample, batch, grid)})
            rows += measure_defenses(casa, sample, tokens, batch, grid, on_run)
            if grid.verdicts:
                verdicts.append({"prompt_tokens": tokens, "batch": batch, **verdict_costs(
                    casa, [[sample] * batch], grid.repeats, grid.warmup, on_run)})
    if trace_dir is not None:
        sample = synthetic_sample(casa, grid.prompt_tokens[0], grid.images, grid.audio, reserve)
        report["trace"] = str(write_trace(casa, sample, grid.batches[0], grid, Path(trace_dir)))
    report.update(load_average_end=[round(x, 2) for x in os.getloadavg()],
                  peak_rss_mb=peak_rss_mb(), inputs=inputs, rows=rows, verdicts=verdicts)
    device = casa.backbone.device
    if device.type == "cuda":
        report["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return report
