"""Correctness of the fused safety head on a GPU at real sizes (T up to 32k, d up to 8192).

    python benchmarks/check_kernel_gpu.py && python benchmarks/bench_safety_attention.py

The unit tests (tests/test_kernel_safety_attention.py) cover every dispatch path at small
sizes; this script runs the compiled kernels on the shapes the model produces, with the plan
the launcher picks by itself, against the float64 reference on the same H (the helpers are the
tests' own). Each head case runs first as `bench_safety_attention.py` times it (no attention
weights, no gradients: the plain forward), then asking for the weights. Exit status 0 when
every case is within tolerance.

Forward tolerances are the tests' for bf16 and fp32 (3e-4 and 1e-5 on |err| / (1 + |ref|)):
the kernel accumulates in fp32 from a hi/lo bf16 split of Q and V (float32 H: tf32 hi/lo
splits of H and of Q and V), so its error stays near fp32 rounding even over
32k tokens and 8192 features, while a kernel that lost the low half drifts by 2-6e-3 at
T = 512-4096 (issue 15), which 3e-4 catches. Gradients sum over every token and feature in
bf16-rounded products, so they get 5x that.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 3e-4}
FIELDS = ("z", "l_safe", "l_unsafe", "p_unsafe")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (B, T, d, K, dtype, gate, lengths, left padding)
HEAD_CASES = [
    (1, 32768, 4096, 4, BF16, "log", None, False),
    (2, 32768, 8192, 8, BF16, "multiply", [32768, 20011], True),
    (1, 512, 4096, 4, BF16, "log", None, False),
    (32, 2048, 4096, 4, BF16, "log", [2048 - 37 * i for i in range(32)], False),
    (4, 4099, 576, 1, FP16, "multiply", [4099, 1, 77, 4000], True),
    (8, 8192, 2048, 4, FP32, "log", None, False),
    (1, 1000, 4096, 16, FP32, "multiply", None, False),  # the d-split forward, float32 H
    (16, 1, 8192, 4, BF16, "log", None, False),
]


def main() -> int:
    if not torch.cuda.is_available():
        print("check_kernel_gpu: no CUDA GPU here; the kernel tests run on CPU through the "
              "Triton interpreter instead: python -m pytest tests/test_kernel_safety_attention.py",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_kernel_safety_attention import make_inputs, pack, reference

    from casa_cli.head import safety_head_reference
    from casa_cli.kernels import safety_attention, safety_head

    failures = 0

    def check(label, got, want, tol):
        nonlocal failures
        err = ((got.double() - want).abs() / (1 + want.abs())).max().item()
        ok = bool(torch.isfinite(got).all()) and err <= tol
        failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {label:10} max err {err:.2e} (tol {tol:.0e})")

    for B, T, d, K, dtype, gate, lengths, left in HEAD_CASES:
        print(f"head B={B} T={T} d={d} K={K} {str(dtype)[6:]} gate={gate} "
              f"{'left' if left else 'right'} padding")
        H, mask, p = make_inputs(B, T, d, K, dtype, lengths, left, seed=T + d)
        ref = reference(H, mask, p, gate, return_weights=True)
        args = (H, mask, p["Q"], p["V"], p["b"], p["token_out"], gate)
        for asked in ("forward", "weights"):
            start = time.perf_counter()
            out = safety_head(*args, return_weights=asked == "weights")
            torch.cuda.synchronize()
            print(f"  {asked}: first call (compiles) {time.perf_counter() - start:.1f} s")
            for field in FIELDS + (("weights",) if asked == "weights" else ()):
                check(field, getattr(out, field), getattr(ref, field), TOL[dtype])
        del H, mask, out, ref

    print("packed lengths [1, 5000, 32768, 77], d=4096 bf16")
    H, mask, p = make_inputs(4, 32768, 4096, 4, BF16, [1, 5000, 32768, 77], seed=5)
    packed, cu = pack(H, mask)
    z, w = safety_attention(packed, p["Q"], p["V"], p["b"], cu_seqlens=cu, return_weights=True)
    ref = reference(H, mask, p, "log", return_weights=True)
    check("z", z, ref.z, TOL[BF16])
    check("weights", w, ref.weights[mask], TOL[BF16])
    del H, mask, packed, ref

    print("gradients B=2 T=8192 d=4096 K=4 bf16, both gates")
    H, mask, p = make_inputs(2, 8192, 4096, 4, BF16, [8192, 3001], True, seed=7)
    H64 = H.double().masked_fill(~mask[..., None], 0.0)
    c = torch.randn(4, 2, device="cuda", dtype=torch.float64)
    for gate in ("log", "multiply"):
        grads = []
        for fn, params in ((safety_head, p), (safety_head_reference,
                                               {k: v.double() for k, v in p.items()})):
            leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
            out = fn(H if fn is safety_head else H64, mask, leaves["Q"], leaves["V"],
                     leaves["b"], leaves["token_out"], gate)
            loss = c[0] * out.z + c[1] * out.l_safe + c[2] * out.l_unsafe + c[3] * out.p_unsafe
            loss.sum().backward()
            grads.append({k: v.grad for k, v in leaves.items()})
        for k in p:
            check(f"d{k} {gate}", grads[0][k], grads[1][k], 5 * TOL[BF16])

    print("all cases within tolerance" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
