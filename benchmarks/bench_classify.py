"""Classify throughput against a plain full forward of the same model (issue 19).

    python benchmarks/bench_classify.py [--model DIR] [--adapter DIR] [--prompts 200]
        [--batch 16] [--repeats 3]

The verdict needs only the decoder layers up to the head's (`prefill(states_only=True)`), so
classify can beat the model's own prefill by up to layers / head layer. Both are timed on the
same HarmBench prompts, the same batches and padding, interleaved per repeat, in one process;
reported as prompts per second (median over repeats) with that bound beside it. A CSV row goes
to benchmarks/results/classify_<device>.csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
import statistics
from pathlib import Path

import torch

import casa_cli
from casa_cli.data.assemble import take_evenly
from casa_cli.data.prompt_sets import load_harmbench
from casa_cli.profiling import Timer, device_name

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--adapter")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    casa = casa_cli.load(args.model, args.adapter)
    backbone = casa.backbone
    samples = [casa_cli.prompt_sample(r["text"], sample_id=str(i)) for i, r in
               enumerate(take_evenly(load_harmbench(), args.prompts))]
    batches = [samples[i:i + args.batch] for i in range(0, len(samples), args.batch)]
    encoded = [backbone.encode(batch) for batch in batches]

    def classify():
        for batch in batches:
            list(casa.classify(batch, batch_size=args.batch))

    def full_forward():
        with torch.no_grad():
            for batch in encoded:
                backbone.prefill(batch, capture=False)

    classify(), full_forward()  # warm-up
    times = {"classify": [], "full_forward": []}
    for _ in range(args.repeats):
        for name, run in (("classify", classify), ("full_forward", full_forward)):
            with Timer(backbone.device) as timer:
                run()
            times[name].append(timer.ms / 1000)
    rate = {name: len(samples) / statistics.median(t) for name, t in times.items()}
    layer = casa.config.layer or backbone.num_layers
    row = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": device_name(backbone.device),
           "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 2),
           "model": backbone.source, "prompts": len(samples), "batch": args.batch,
           "repeats": args.repeats, "head_layer": layer, "layers": backbone.num_layers,
           "classify_prompts_per_s": round(rate["classify"], 2),
           "full_forward_prompts_per_s": round(rate["full_forward"], 2),
           "speedup": round(rate["classify"] / rate["full_forward"], 3),
           "bound": round(backbone.num_layers / layer, 3)}
    for key, value in row.items():
        print(f"{key}: {value}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"classify_{re.sub(r'[^A-Za-z0-9.]+', '-', row['device']).strip('-')}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    main()
