"""What a verdict costs against the model's own forward (issue 19): `casa profile`'s
classify rows and benchmarks/bench_classify.py.

A verdict needs only the decoder layers up to the head's, so
- `Casa.classify` (whose prefill stops after the head's layer) can beat a plain full forward
  of the same batches by up to layers / head layer (`bound`);
- a refusal (`casa generate` with the refusal text on `unsafe`) stops the prefill there too,
  and costs that share of a full prefill.

Each round times, interleaved: classify of every batch (input preparation included), a plain
full forward of the same encoded batches, and for each batch's first prompt (as `copies`
of it) a forced refusal (threshold 0) and the plain model's prefill, both from the timings
decoding records. Ratios are paired within a round; each figure is reported as
its median and range over the rounds.
"""
from __future__ import annotations

import torch

from casa_cli.decoding import DecodeOptions
from casa_cli.inputs import Sample
from casa_cli.timing import Timer, stats

ONE_TOKEN = DecodeOptions(max_new_tokens=1, ignore_eos=True)


def time_to_refusal(casa, sample: Sample, copies: int) -> tuple[float, float]:
    """ms until a refusal of `sample` (the prefill to the head's layer and the head), and ms
    of the plain model's full prefill of it, as `casa generate` records them."""
    refused = casa.generate(sample, "casa", on_unsafe="refuse", threshold=0.0, copies=copies)
    if not refused.refused:
        raise RuntimeError("a verdict at threshold 0 did not refuse")
    plain = casa.generate(sample, "none", options=ONE_TOKEN, copies=copies)
    return refused.timings["prefill_ms"] + refused.timings["safety_ms"], plain.timings["prefill_ms"]


@torch.no_grad()
def verdict_costs(casa, batches: list[list[Sample]], repeats: int, warmup: int = 1,
                  on_round=lambda: None, refusal_copies: int | None = None) -> dict:
    """Classify throughput against a plain full forward of the same `batches`, and the time
    to a refusal against a full prefill (`refusal_copies` rows; None: the batch's size),
    over `repeats` rounds after `warmup`."""
    backbone = casa.backbone
    encoded = [backbone.encode(batch) for batch in batches]
    prompts = sum(len(batch) for batch in batches)
    rounds = []
    for round_ in range(warmup + repeats):
        with Timer(backbone.device) as classify:
            for batch in batches:
                list(casa.classify(batch, batch_size=len(batch)))
        with Timer(backbone.device) as full:
            for batch in encoded:
                backbone.prefill(batch, capture=False)
        refusal = [time_to_refusal(casa, batch[0], refusal_copies or len(batch)) for batch in batches]
        on_round()
        if round_ >= warmup:
            refused, plain = sum(r for r, _ in refusal), sum(p for _, p in refusal)
            rounds.append({"classify_prompts_per_s": prompts / classify.ms * 1000,
                           "full_forward_prompts_per_s": prompts / full.ms * 1000,
                           "classify_speedup": full.ms / classify.ms,
                           "refusal_ms": refused / len(batches),
                           "full_prefill_ms": plain / len(batches),
                           "refusal_vs_prefill": refused / plain})
    layer = backbone.resolve_layer(casa.config.layer)
    return {"prompts": prompts, "head_layer": layer, "layers": backbone.num_layers,
            "bound": round(backbone.num_layers / layer, 3),
            **{key: stats([r[key] for r in rounds]) for key in rounds[0]}}
