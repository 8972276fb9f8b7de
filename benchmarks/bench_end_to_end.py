"""End-to-end cost of each defence over a grid (docs/design.md §7), as CSV rows.

    python benchmarks/bench_end_to_end.py                 # the embedded default, default grid
    python benchmarks/bench_end_to_end.py --prompt-tokens 128,512 --batch 1 --repeats 5
    python benchmarks/bench_end_to_end.py --model ./Qwen2.5-VL-3B-Instruct --batch 1,8,32

The measurements are `casa_cli.profiling`'s, the ones `casa profile` prints: synthetic prompts
of exact token counts, every defence run through decoding's own loop, repeats interleaved
across defences, medians (with min and max for prefill and first token) and ratios to `none`
from the same round. `safety_ms` is CASA's head step inside generation, or for `guard` the
whole external-guard call (guard prompt prefill + a 5-token verdict); `safety_head_us_*` is
the head alone on the grid point's H, per backend. One row per grid point and defence is
appended to benchmarks/results/end_to_end_<device>.csv (the CUDA device's name, else the
CPU's model name), with the load average around the run: CPU timings on a busy machine
are only comparable within one run.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from pathlib import Path

from casa_cli import profiling
from casa_cli.timing import device_name

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["date", "device", "model", "adapter", "dtype", "threads", "load_average",
           "defence", "prompt_tokens", "batch", "new_tokens", "repeats", "input_tokens",
           "load_ms", "prepare_ms", "prefill_ms", "prefill_ms_min", "prefill_ms_max",
           "safety_ms", "safety_head_us_torch", "safety_head_us_triton", "first_token_ms",
           "first_token_ms_min", "first_token_ms_max", "decode_tokens_per_s",
           "decode_ms_per_token", "prefill_ratio", "first_token_ratio", "decode_cost_ratio",
           "safety_pct_of_prefill", "guard_vs_casa", "guard_prompt_tokens", "peak_rss_mb",
           "peak_gpu_mb"]
SPREAD = ("prefill_ms", "first_token_ms")  # the figures whose min and max get columns


def csv_rows(report: dict) -> list[dict]:
    """One flat row per grid point and defence: medians, plus the SPREAD ranges."""
    inputs = {(i["prompt_tokens"], i["batch"]): i for i in report["inputs"]}
    common = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": report["device_name"],
              "model": report["model"], "adapter": report["adapter"] or "",
              "dtype": report["dtype"], "threads": report["threads"],
              "load_average": f"{report['load_average_start'][0]}->{report['load_average_end'][0]}",
              "new_tokens": report["new_tokens"], "repeats": report["repeats"],
              "load_ms": report["load_ms"], "peak_rss_mb": report["peak_rss_mb"]}
    rows = []
    for row in report["rows"]:
        point = inputs[(row["prompt_tokens"], row["batch"])]
        flat = {**common, "prepare_ms": point["prepare_ms"]["median"]}
        for backend, us in point["safety_head_us"].items():
            flat[f"safety_head_us_{backend}"] = us["median"]
        for key, value in row.items():
            if isinstance(value, dict):
                flat[key] = value["median"]
                if key in SPREAD:
                    flat[f"{key}_min"], flat[f"{key}_max"] = value["min"], value["max"]
            else:
                flat[key] = value
        rows.append(flat)
    return rows


def listed(kind):
    return lambda text: tuple(kind(item) for item in text.split(",") if item)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory or .gguf [default: the embedded default]")
    parser.add_argument("--adapter", help="CASA adapter [default: the shipped one for the default]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--defenses", type=listed(str), default=profiling.DEFAULT_DEFENSES)
    parser.add_argument("--prompt-tokens", type=listed(int), default=(128, 512))
    parser.add_argument("--batch", type=listed(int), default=(1, 8))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    grid = profiling.Grid(defenses=args.defenses, prompt_tokens=args.prompt_tokens,
                          batches=args.batch, new_tokens=args.new_tokens,
                          repeats=args.repeats, warmup=args.warmup)
    casa, load_ms = profiling.load_timed(model=args.model, adapter=args.adapter,
                                         device=args.device, dtype=args.dtype)
    print(f"{casa.backbone.source} on {device_name(casa.backbone.device)}: "
          f"{grid.runs} runs", file=sys.stderr)
    report = profiling.profile(casa, grid, load_ms)
    rows = csv_rows(report)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", report["device_name"]).strip("-")
    out_path = RESULTS / f"end_to_end_{slug}.csv"
    RESULTS.mkdir(exist_ok=True)
    new_file = not out_path.exists()
    with out_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    print(f"{'tokens':>6} {'B':>3} {'defence':8} {'prefill ms':>10} {'safety ms':>9} "
          f"{'1st tok ms':>10} {'tok/s':>7} {'x1st':>5} {'x/tok':>5} {'%prefill':>8}")
    for r in rows:
        safety = f"{r['safety_ms']:>9.3f} " if "safety_ms" in r else f"{'-':>9} "
        share = f"{r['safety_pct_of_prefill']:>8.2f}" if "safety_ms" in r else f"{'-':>8}"
        print(f"{r['prompt_tokens']:>6} {r['batch']:>3} {r['defence']:8} {r['prefill_ms']:>10.2f} "
              f"{safety}{r['first_token_ms']:>10.2f} {r['decode_tokens_per_s']:>7.1f} "
              f"{r['first_token_ratio']:>5.2f} {r['decode_cost_ratio']:>5.2f} {share}")
    print(f"appended {len(rows)} rows to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
