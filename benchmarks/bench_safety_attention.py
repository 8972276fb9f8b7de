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
(bytes read + written). Rows are appended to benchmarks/results/safety_attention_<device>.csv.
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
COLUMNS = ["date", "device", "impl", "dtype", "batch", "T", "d", "K", "H_MB", "time_us",
           "GB_s", "pct_copy", "copy_GB_s", "speedup_vs_eager", "plan"]


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


def device_file(name: str) -> Path:
    return RESULTS / f"safety_attention_{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}.csv"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the target shapes, bf16")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma list of bf16,fp16,fp32")
    parser.add_argument("--impls", default="eager,compile,sdpa,triton",
                        help="comma list; eager first gives the speedup column its base")
    parser.add_argument("--max-gb", type=float, default=4.0,
                        help="skip shapes whose H is larger than this many GB")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_safety_attention: no CUDA GPU here; this benchmark times GPU kernels and "
              "has nothing to measure on a CPU-only machine.", file=sys.stderr)
        return 2

    from triton.testing import do_bench

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
              f"{'GB/s':>7} {'%copy':>6} {'xeager':>7}")
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
                plan = plan_launch(B, T, d, dtype, H.device)
                eager_us = None
                for impl in impls:
                    try:
                        us = 1e3 * do_bench(lambda: runners[impl](*inputs), return_mode="median")
                    except torch.OutOfMemoryError:
                        print(f"{impl:8} {dtype_name:5} {B:>3} {T:>6} {d:>5}: out of memory")
                        torch.cuda.empty_cache()
                        continue
                    eager_us = us if impl == "eager" else eager_us
                    gbps = nbytes / (us * 1e-6) / 1e9
                    row = dict(date=time.strftime("%Y-%m-%dT%H:%M:%S"), device=device, impl=impl,
                               dtype=dtype_name, batch=B, T=T, d=d, K=HEADS,
                               H_MB=round(nbytes / 1e6, 2), time_us=round(us, 2),
                               GB_s=round(gbps, 1), pct_copy=round(100 * gbps / copy_gbps, 1),
                               copy_GB_s=round(copy_gbps, 1),
                               speedup_vs_eager=round(eager_us / us, 2) if eager_us else "",
                               plan=(f"bt{plan.block_t}/bd{plan.block_d}/splits{plan.splits}"
                                     if impl == "triton" else ""))
                    writer.writerow(row)
                    f.flush()
                    print(f"{impl:8} {dtype_name:5} {B:>3} {T:>6} {d:>5} {row['H_MB']:>7} "
                          f"{us:>9.1f} {gbps:>7.0f} {row['pct_copy']:>6} "
                          f"{row['speedup_vs_eager']:>7}")
                del H, inputs
    print(f"appended to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
