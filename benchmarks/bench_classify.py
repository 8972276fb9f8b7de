"""What a verdict costs against the model's own forward (issue 19), on real prompts.

    python benchmarks/bench_classify.py [--model DIR] [--adapter DIR] [--prompts 200]
        [--batch 16] [--repeats 3] [--refusal-copies 1]

A verdict needs only the decoder layers up to the head's, so classify can beat the model's
own prefill by up to layers / head layer, and a refusal costs that share of a full prefill.
`casa_cli.verdict_cost` times both (as `casa profile` does on synthetic prompts) on HarmBench
prompts: classify against a plain full forward of the same batches, and a refusal of each
batch's first prompt against the plain model's prefill of it (at batch 1 unless told),
interleaved per repeat in one process after a warm-up; medians with their range. A CSV row
goes to benchmarks/results/verdicts_<device>.csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
from pathlib import Path

import torch

import casa_cli
from casa_cli.data.assemble import take_evenly
from casa_cli.data.prompt_sets import load_harmbench
from casa_cli.timing import device_name
from casa_cli.verdict_cost import verdict_costs

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--adapter")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--refusal-copies", type=int, default=1)
    args = parser.parse_args()

    casa = casa_cli.load(args.model, args.adapter)
    samples = [casa_cli.prompt_sample(r["text"], sample_id=str(i)) for i, r in
               enumerate(take_evenly(load_harmbench(), args.prompts))]
    batches = [samples[i:i + args.batch] for i in range(0, len(samples), args.batch)]
    costs = verdict_costs(casa, batches, args.repeats, warmup=1,
                          refusal_copies=args.refusal_copies)
    backbone = casa.backbone
    row = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": device_name(backbone.device),
           "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 2),
           "model": backbone.source, "adapter": casa.adapter_name, "batch": args.batch,
           "repeats": args.repeats,
           "refusal_copies": args.refusal_copies}
    for key, value in costs.items():
        if isinstance(value, dict):  # median [min-max]
            row.update({key: round(value["median"], 3), f"{key}_min": round(value["min"], 3),
                        f"{key}_max": round(value["max"], 3)})
        else:
            row[key] = value
    for key, value in row.items():
        print(f"{key}: {value}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"verdicts_{re.sub(r'[^A-Za-z0-9.]+', '-', row['device']).strip('-')}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    main()
