"""Benchmark of the fused safety head (docs/design.md §7): time, GB/s and % of copy bandwidth.

    python benchmarks/bench_safety_attention.py            # full sweep
    python benchmarks/bench_safety_attention.py --quick    # the target shapes only

Each implementation computes the whole head (z, both safety-token logits, gated p_unsafe)
on H (B, T, d) with a bool mask, K = 4 heads:
  triton   casa_cli.kernels.safety_head (one read of H)
  eager    casa_cli.head.safety_head_reference
  compile  torch.compile of the same reference
  sdpa     the attention through F.scaled_dot_product_attention (queries = the K score
           vectors, keys = values = H), then r_j = out_j . V_j and the same epilogue
Times are medians of triton.testing.do_bench, which clears the L2 cache before every call.
GB/s = bytes(H) / time; % of peak is against a device-to-device copy measured in the same run
(bytes read + written). For H up to GRAPH_MAX_MB the triton row also gives `graph_us`: the
call captured in a CUDA graph and replayed (triton.testing.do_bench_cudagraph), so launch
overhead is gone and H stays in L2 between replays: the latency a decode loop that captures
the safety step would see. Each row records the torch and Triton versions. Rows are appended
to benchmarks/results/safety_attention_<device>.csv.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FULL = dict(T=(512, 2048, 8192, 32768), d=(576, 2048, 4096, 8192), batch=(1, 8, 32))
# The targets: B=1, T=512, d=4096 under 10 us; H of 64 MB and more at >= 80% of copy bandwidth.
QUICK = [(1, 512, 4096), (1, 8192, 4096), (1, 32768, 4096), (8, 2048, 576), (4, 8192, 8192),
         (32, 2048, 4096)]
HEADS = 4
GRAPH_MAX_MB = 64
COLUMNS = ["date", "device", "impl", "dtype", "batch", "T", "d", "K", "H_MB", "time_us",
           "GB_s", "pct_copy", "copy_GB_s", "speedup_vs_eager", "speedup_vs_compile", "graph_us",
           "plan", "torch", "triton"]


def copy_bandwidth_gbps(do_bench) -> float:
    """A 1 GiB device-to-device copy: (bytes read + bytes written) / time."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def sdpa_head(H, mask, Q, V, b, token_out, gate):
    """The safety head through SDPA: K queries attend over the T tokens of H, which serves as
    both keys and values; the value vectors are applied after the (linear) weighted sum."""
    from casa_cli.head import gated_logits, last_valid_index
    attn_mask = mask[:, None, None, :]  # (B, 1, 1, T), broadcast over the K queries
    out = F.scaled_dot_product_attention(Q.to(H.dtype)[None, None].expand(H.shape[0], 1, -1, -1),
                                         H[:, None], H[:, None], attn_mask=attn_mask)
    z = (out[:, 0].float() * V).sum(dim=(1, 2)) + b
    h_last = H[torch.arange(H.shape[0], device=H.device), last_valid_index(mask)]
    l_safe, l_unsafe = (h_last.float() @ token_out.T).unbind(-1)
    return torch.softmax(gated_logits(l_safe, l_unsafe, z, gate), dim=-1)[..., 1]


def speedup(base_us: dict, base: str, impl: str, us: float):
    """base's time over this one, for the row of another implementation ('' otherwise)."""
    return round(base_us[base] / us, 2) if base in base_us and impl != base else ""


def device_file(name: str) -> Path:
    return RESULTS / f"safety_attention_{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}.csv"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the target shapes, bf16")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma list of bf16,fp16,fp32")
    parser.add_argument("--impls", default="eager,compile,sdpa,triton",
                        help="comma list; eager and compile before triton give the speedup "
                             "columns their bases")
    parser.add_argument("--max-gb", type=float, default=4.0,
                        help="skip shapes whose H is larger than this many GB")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_safety_attention: no CUDA GPU here; this benchmark times GPU kernels and "
              "has nothing to measure on a CPU-only machine.", file=sys.stderr)
        return 2

    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    from casa_cli.head import safety_head_reference
    from casa_cli.kernels import plan_launch, safety_head

    device = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_gbps(do_bench)
    print(f"{device}: device-to-device copy {copy_gbps:.0f} GB/s")
    impls = args.impls.split(",")
    compiled = torch.compile(safety_head_reference, dynamic=True)
    runners = {
        "triton": lambda *a: safety_head(*a).p_unsafe,
        "eager": lambda *a: safety_head_reference(*a).p_unsafe,
        "compile": lambda *a: compiled(*a).p_unsafe,
        "sdpa": sdpa_head,
    }
    dtypes = ["bf16"] if args.quick else args.dtypes.split(",")
    shapes = QUICK if args.quick else [(B, T, d) for B in FULL["batch"] for T in FULL["T"]
                                       for d in FULL["d"]]
    out_path = device_file(device)
    RESULTS.mkdir(exist_ok=True)
    new_file = not out_path.exists()
    with out_path.open("a", newline="") as f, torch.no_grad():
        writer = csv.DictWriter(f, COLUMNS)
        if new_file:
            writer.writeheader()
        print(f"{'impl':8} {'dtype':5} {'B':>3} {'T':>6} {'d':>5} {'MB':>7} {'us':>9} "
              f"{'GB/s':>7} {'%copy':>6} {'xeager':>7} {'xcompile':>8} {'graph_us':>8}")
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for B, T, d in shapes:
                nbytes = B * T * d * dtype.itemsize
                if nbytes > args.max_gb * 1e9:
                    continue
                g = torch.Generator(device="cuda").manual_seed(0)
                H = torch.randn(B, T, d, device="cuda", dtype=dtype, generator=g)
                mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
                Q = torch.randn(HEADS, d, device="cuda", generator=g)
                V = torch.randn(HEADS, d, device="cuda", generator=g) / math.sqrt(d)
                b = torch.zeros((), device="cuda")
                token_out = torch.randn(2, d, device="cuda", generator=g) / math.sqrt(d)
                inputs = (H, mask, Q, V, b, token_out, "log")
                plan = plan_launch(B, T, d, HEADS, dtype, H.device)
                base_us = {}
                for impl in impls:
                    try:
                        us = 1e3 * do_bench(lambda: runners[impl](*inputs), return_mode="median")
                    except torch.OutOfMemoryError:
                        print(f"{impl:8} {dtype_name:5} {B:>3} {T:>6} {d:>5}: out of memory")
                        torch.cuda.empty_cache()
                        continue
                    base_us[impl] = us
                    graph_us = ""
                    if impl == "triton" and nbytes <= GRAPH_MAX_MB * 1e6:
                        try:
                            graph_us = round(1e3 * do_bench_cudagraph(
                                lambda: runners[impl](*inputs), return_mode="median"), 2)
                        except RuntimeError as err:  # a host sync would break the capture
                            print(f"  CUDA graph capture failed: {err}")
                            graph_us = "capture failed"
                    gbps = nbytes / (us * 1e-6) / 1e9
                    row = dict(date=time.strftime("%Y-%m-%dT%H:%M:%S"), device=device, impl=impl,
                               dtype=dtype_name, batch=B, T=T, d=d, K=HEADS,
                               H_MB=round(nbytes / 1e6, 2), time_us=round(us, 2),
                               GB_s=round(gbps, 1), pct_copy=round(100 * gbps / copy_gbps, 1),
                               copy_GB_s=round(copy_gbps, 1),
                               speedup_vs_eager=speedup(base_us, "eager", impl, us),
                               speedup_vs_compile=speedup(base_us, "compile", impl, us),
                               graph_us=graph_us,
                               plan=(f"bt{plan.block_t}/bd{plan.block_d}/splits{plan.splits}"
                                     f"/dsplits{plan.d_splits}/warps{plan.num_warps}" if impl == "triton" else ""),
                               torch=torch.__version__, triton=triton.__version__)
                    writer.writerow(row)
                    f.flush()
                    print(f"{impl:8} {dtype_name:5} {B:>3} {T:>6} {d:>5} {row['H_MB']:>7} "
                          f"{us:>9.1f} {gbps:>7.0f} {row['pct_copy']:>6} "
                          f"{row['speedup_vs_eager']:>7} {row['speedup_vs_compile']:>8} "
                          f"{graph_us:>8}")
                del H, inputs
    print(f"appended to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
