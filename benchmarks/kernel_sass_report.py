"""SASS report of the safety-head kernels for sm_90 (H100/H200), built without a GPU.

    python benchmarks/kernel_sass_report.py --csv benchmarks/results/kernel_sass_sm90.csv
    python benchmarks/kernel_sass_report.py --quick     # the two target shapes, bf16, K = 4

For every shape of the grid (dtype x B x T x d x K) it runs the public launchers of
`casa_cli.kernels` on `meta` tensors with the kernel launches intercepted, so each row is
exactly what the code would launch on a 132-SM H100/H200: the benchmarked inference call
(`safety_head` with a full mask, log gate, no weights) gives the forward kernel and, when T is
split, the combine kernel; a prompt too short to fill the GPU takes the d-split forward, two
launches: safety_fwd_partial_kernel (H in, partial scores and values out) and the forward
FROM_PARTIALS (row `safety_fwd_kernel/from_partials`); a call with gradients of Q and V gives
the backward kernel. Each
launch is compiled ahead of time with `triton.compile` for `GPUTarget("cuda", 90, 32)` and its
cubin read with the `cuobjdump` that ships inside Triton's NVIDIA backend. Nothing runs on a
GPU and nothing here is measured.

Columns:
  registers, spill_bytes    `cuobjdump -res-usage` REG and LOCAL (bytes of local memory per
                            thread, where ptxas puts spills; 0 means no spill)
  shared_bytes              shared memory the launch requests (Triton's metadata)
  sass_per_byte             SASS instructions of the steady-state inner loop x num_warps /
                            bytes of H one iteration consumes (block_t x block_d x itemsize; the
                            combine kernel's loop reads one row of h_last: block_d x itemsize;
                            the from_partials loop, which the compiler unrolls, what its LDG
                            instructions read: d parts of a token tile's float32 partials).
                            The loop is the innermost backward branch that holds tensor-core
                            instructions (else global loads).
  roofline_us_h100/h200     HBM bytes of this kernel (H, plus the small Q/V/mask/partials/
                            outputs) / spec-sheet peak bandwidth (H100 SXM 3.35 TB/s, H200
                            4.8 TB/s; no measured copy bandwidth is in benchmarks/results yet)
                            + 5 us launch overhead.
  loop_instructions, loop_bytes, hbm_bytes, splits, d_splits   the inputs of the two estimates.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

# Triton 3.9 warns when this is unset, and an empty value turns FMA fusion off, which changes
# the instruction counts: compile as a default launch would.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

COLUMNS = ["kernel", "dtype", "B", "T", "d", "K", "block_t", "block_d", "num_warps",
           "num_stages", "programs", "registers", "spill_bytes", "shared_bytes", "sass_per_byte",
           "roofline_us_h100", "roofline_us_h200", "loop_instructions", "loop_bytes", "hbm_bytes",
           "splits", "d_splits"]
GRID = dict(dtype=("bf16", "fp16", "fp32"), B=(1, 8, 32), T=(512, 4096, 32768),
            d=(576, 4096, 8192), K=(1, 4, 16))
QUICK = [("bf16", 1, 512, 4096, 4), ("bf16", 8, 32768, 4096, 4)]
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
SM90_SMS = 132  # H100 SXM and H200 both have 132 SMs, so the planner picks the same plan
# Spec-sheet peak HBM bandwidth, GB/s. Prefer a measured device-to-device copy when one is
# committed (benchmarks/bench_safety_attention.py records copy_GB_s per device).
BANDWIDTH_GBS = {"h100": 3350.0, "h200": 4800.0}
LAUNCH_US = 5.0
# The forward's second launch in the d-split path (safety_fwd_kernel with FROM_PARTIALS): it
# sums the partial scores and values instead of reading H, so it has a row of its own.
FROM_PARTIALS = "safety_fwd_kernel/from_partials"
TARGET = ("cuda", 90, 32)


# --------------------------------------------------------------------------- SASS parsing

class Instr(NamedTuple):
    addr: int
    opcode: str  # e.g. HMMA.16816.F32.BF16, predicate stripped
    text: str


class Loop(NamedTuple):
    start: int  # address of the branch target (first instruction of the body)
    end: int  # address of the backward branch
    instructions: int  # instructions in [start, end], the branch included
    has_mma: bool
    has_global_load: bool
    warp_load_bytes: int = 0  # bytes one warp's LDG instructions in the body read (all lanes)


_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z0-9_.]+)?\s+(?:`?\(?)0x([0-9a-fA-F]+)")
_GLOBAL_LOAD = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")


def is_tensor_core(opcode: str) -> bool:
    """HMMA, HGMMA, IMMA, ...; not HFMA2.MMA (an FMA issued on the MMA pipe)."""
    return opcode.split(".")[0].endswith("MMA")


def parse_sass(text: str) -> list[Instr]:
    """The instructions of one function's SASS listing (`cuobjdump -sass`), in order."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        body = re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(2))
        if not body:
            continue
        out.append(Instr(int(m.group(1), 16), body.split()[0], body))
    return out


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Every backward branch as a loop [target, branch]; self-branches (the trap after EXIT)
    are not loops."""
    loops = []
    for ins in instrs:
        if not ins.opcode.startswith("BRA"):
            continue
        m = _BRANCH.search(ins.text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= ins.addr:
            continue
        body = [i for i in instrs if target <= i.addr <= ins.addr]
        loops.append(Loop(target, ins.addr, len(body),
                          any(is_tensor_core(i.opcode) for i in body),
                          any(i.opcode.split(".")[0] in _GLOBAL_LOAD for i in body),
                          sum(ldg_lane_bytes(i.opcode) * 32 for i in body)))
    return loops


def ldg_lane_bytes(opcode: str) -> int:
    """Bytes one lane reads with this instruction if it is a plain global load (LDG.E.64: 8),
    else 0. Counting these gives the bytes of a loop that the compiler unrolled."""
    parts = opcode.split(".")
    if parts[0] != "LDG":
        return 0
    widths = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
    return next((widths[p] for p in parts[1:] if p in widths), 4)


def innermost(loops: list[Loop]) -> list[Loop]:
    """Loops that contain no other loop."""
    return [a for a in loops
            if not any(b is not a and a.start <= b.start and b.end <= a.end and b != a
                       for b in loops)]


def steady_state_loop(instrs: list[Instr]) -> Loop | None:
    """The loop that streams H: the innermost loop with tensor-core instructions, else the
    innermost loop with global loads; the longest if several. None if there is no loop."""
    inner = innermost(find_loops(instrs))
    for pick in (lambda l: l.has_mma, lambda l: l.has_global_load, lambda l: True):
        chosen = [l for l in inner if pick(l)]
        if chosen:
            return max(chosen, key=lambda l: l.instructions)
    return None


def sass_per_byte(loop_instructions: int, num_warps: int, loop_bytes: int) -> float:
    """Instructions issued per byte of H: every warp runs the loop body once per iteration."""
    return loop_instructions * num_warps / loop_bytes


def roofline_us(hbm_bytes: float, bandwidth_gbs: float, launches: int = 1) -> float:
    """Time at full bandwidth plus a fixed cost per kernel launched, in microseconds."""
    return hbm_bytes / (bandwidth_gbs * 1e3) + LAUNCH_US * launches


# ------------------------------------------------------------------- the launches planned

class Launch(NamedTuple):
    fn: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


class _Recorder:
    def __init__(self, fn, sink: list):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.fn, tuple(grid), args, kwargs))
        return launch


@contextlib.contextmanager
def _intercepted(sink: list):
    """Run the launchers on meta tensors: kernels recorded instead of launched, the planner
    told it has an H100/H200's SM count, host-side checks that read tensor values skipped."""
    from triton.runtime.jit import JITFunction
    from casa_cli.kernels import safety_attention_function as host
    saved = {}
    for name, value in vars(host).items():
        if isinstance(value, JITFunction):
            saved[name] = value
    patches = {name: _Recorder(fn, sink) for name, fn in saved.items()}
    if not patches:
        raise RuntimeError("no Triton kernel found in casa_cli.kernels.safety_attention_function")
    if not hasattr(host, "_sm_count"):
        raise RuntimeError("the launch planner no longer asks _sm_count for the SM count; "
                           "update _intercepted")
    patches["_sm_count"] = lambda device: SM90_SMS
    if hasattr(host, "check_mask"):  # a host sync on the mask's values; meta tensors have none
        patches["check_mask"] = lambda mask: None
    old = {name: getattr(host, name) for name in patches}
    env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # lets the launcher accept non-CUDA tensors
    try:
        for name, value in patches.items():
            setattr(host, name, value)
        yield
    finally:
        for name, value in old.items():
            setattr(host, name, value)
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env


def planned_launches(dtype: str, B: int, T: int, d: int, K: int) -> list[Launch]:
    """The kernels the public calls launch for this shape: the benchmarked inference call
    (forward, combine) and then the backward kernel of a call with gradients."""
    import torch
    from casa_cli.kernels import safety_head
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    meta = dict(device="meta")
    H = torch.empty(B, T, d, dtype=tdt, **meta)
    mask = torch.ones(B, T, dtype=torch.bool, **meta)
    Q, V, tok = (torch.empty(*s, **meta) for s in ((K, d), (K, d), (2, d)))
    b = torch.empty(1, **meta)
    inference: list[Launch] = []
    training: list[Launch] = []
    with _intercepted(inference), torch.no_grad():
        safety_head(H, mask, Q, V, b, tok, "log")
    Qg, Vg = Q.clone().requires_grad_(), V.clone().requires_grad_()
    with _intercepted(training):
        out = safety_head(H, mask, Qg, Vg, b, tok, "log")
        start = len(training)
        torch.autograd.grad((out.z.sum() + out.p_unsafe.sum()), (Qg, Vg))
    seen = {l.name for l in inference}
    return inference + [l for l in training[start:] if l.name not in seen]


# ------------------------------------------------------------- compile and read the cubin

def nvidia_tool(name: str) -> Path:
    """A binary of Triton's NVIDIA backend: the one its knobs resolve (TRITON_<NAME>_PATH, else
    the copy shipped inside the installed triton package)."""
    from triton import knobs
    return Path(getattr(knobs.nvidia, name).path)


def tools_available() -> bool:
    try:
        return all(nvidia_tool(t).is_file() for t in ("ptxas", "cuobjdump"))
    except (ImportError, AttributeError, RuntimeError):
        return False


@dataclass
class Compiled:
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int
    num_stages: int
    loop: Loop | None
    seconds: float


_COMPILED: dict[str, Compiled] = {}


def _specialize(launch: Launch):
    """(signature, constexprs, attrs, options) exactly as Triton's launcher derives them from
    these arguments, for the sm_90 backend."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget(*TARGET))
    fn = launch.fn
    kwargs = dict(launch.kwargs)
    # The options JITFunction.run adds from the knobs before it binds the arguments.
    from triton import knobs
    for key, knob in (("debug", lambda: fn.debug or knobs.runtime.debug),
                      ("instrumentation_mode", lambda: knobs.compilation.instrumentation_mode),
                      ("fpsan_homomorphic_casts",
                       lambda: knobs.compilation.fpsan_homomorphic_casts)):
        with contextlib.suppress(AttributeError):
            kwargs.setdefault(key, knob())
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options


def _cuobjdump(flag: str, cubin: Path) -> str:
    return subprocess.run([str(nvidia_tool("cuobjdump")), flag, str(cubin)], check=True,
                          capture_output=True, text=True).stdout


def res_usage(text: str) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (single) function in `cuobjdump -res-usage` output."""
    m = re.search(r"Function [^:]+:\s*\n\s*(.*)", text)
    if not m:
        raise ValueError("no function in cuobjdump -res-usage output")
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", m.group(1))}


def compile_sm90(launch: Launch) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature, constexprs, attrs, options = _specialize(launch)
    key = repr((launch.name, sorted(signature.items()), sorted(constexprs.items()),
                sorted(attrs.items()), sorted(options.__dict__.items())))
    if key in _COMPILED:
        return _COMPILED[key]
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs),
                            target=GPUTarget(*TARGET), options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{launch.name}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = res_usage(_cuobjdump("-res-usage", cubin))
        sass = _cuobjdump("-sass", cubin)
    out = Compiled(usage["REG"], usage.get("LOCAL", 0), kernel.metadata.shared,
                   kernel.metadata.num_warps, kernel.metadata.num_stages,
                   steady_state_loop(parse_sass(sass)), time.perf_counter() - t0)
    _COMPILED[key] = out
    return out


# ------------------------------------------------------------------------ HBM bytes moved

def hbm_bytes(kernel: str, dtype: str, B: int, T: int, d: int, K: int, splits: int,
              d_splits: int = 1) -> int:
    """Bytes one kernel moves to or from HBM, counting each buffer once (Q, V and token_out
    are re-read from L2, not HBM). The forward and backward read all of H (a full mask); in
    the d-split forward the partial kernel reads H and writes float32 partial scores and
    values per token and d part, and the forward (FROM_PARTIALS) reads those instead of H."""
    h = ITEMSIZE[dtype]
    f32 = 4
    epilogue = B * d * h + 2 * d * f32 + B * (K * 2 + 4) * f32  # h_last, token_out, outputs
    partials = B * splits * (3 * K + 1) * f32
    d_partials = B * T * d_splits * 2 * K * f32
    streamed = B * T * d * h + B * T + 2 * K * d * f32  # H, the mask, Q and V
    if kernel == "safety_fwd_partial_kernel":
        return streamed + d_partials
    if kernel == FROM_PARTIALS:
        return d_partials + B * T + (epilogue if splits == 1 else partials)
    if kernel == "safety_fwd_kernel":
        return streamed + (epilogue if splits == 1 else partials)
    if kernel == "safety_combine_kernel":
        return partials + epilogue
    if kernel == "safety_bwd_kernel":
        # H, the stored scores and values, and the dQ/dV slabs of every chunk
        return B * T * d * h + 2 * B * T * K * f32 + B * splits * 2 * K * d * f32
    raise ValueError(f"unknown kernel {kernel}")


# -------------------------------------------------------------------------------- report

def report_rows(shapes: Iterable[tuple], log=print) -> list[dict]:
    rows = []
    for dtype, B, T, d, K in shapes:
        launches = planned_launches(dtype, B, T, d, K)
        fwd_splits = next((l.grid[1] for l in launches if "fwd" in l.name), 1)
        d_splits = next((l.grid[2] for l in launches if l.name == "safety_fwd_partial_kernel"), 1)
        for launch in launches:
            c = compile_sm90(launch)
            kw = launch.kwargs
            kernel = FROM_PARTIALS if kw.get("FROM_PARTIALS") else launch.name
            block_t, block_d = kw.get("BLOCK_T"), kw.get("BLOCK_D")
            splits = launch.grid[2] if "bwd" in launch.name else fwd_splits
            # One tile of H per iteration; the combine's loop reads one row (h_last), the
            # FROM_PARTIALS forward's one d part's scores and values of a token tile.
            if kernel == FROM_PARTIALS and c.loop:  # unrolled: count what its loads read
                loop_bytes = c.loop.warp_load_bytes * c.num_warps
            else:
                tile = block_d if "combine" in kernel else block_t * block_d
                loop_bytes = tile * ITEMSIZE[dtype]
            moved = hbm_bytes(kernel, dtype, B, T, d, K, splits, d_splits)
            rows.append(dict(
                kernel=kernel, dtype=dtype, B=B, T=T, d=d, K=K, block_t=block_t,
                block_d=block_d, num_warps=c.num_warps, num_stages=c.num_stages,
                programs=launch.programs, registers=c.registers, spill_bytes=c.spill_bytes,
                shared_bytes=c.shared_bytes,
                sass_per_byte=(round(sass_per_byte(c.loop.instructions, c.num_warps,
                                                   loop_bytes), 4) if c.loop else ""),
                roofline_us_h100=round(roofline_us(moved, BANDWIDTH_GBS["h100"]), 2),
                roofline_us_h200=round(roofline_us(moved, BANDWIDTH_GBS["h200"]), 2),
                loop_instructions=c.loop.instructions if c.loop else "", loop_bytes=loop_bytes,
                hbm_bytes=moved, splits=splits, d_splits=d_splits))
        done = rows[-len(launches):]
        log(f"{dtype} B={B} T={T} d={d} K={K}: "
            + ", ".join(f"{r['kernel'].replace('safety_', '').replace('_kernel', '')} "
                        f"{r['sass_per_byte']}/B {r['registers']}reg" for r in done)
            + f"  ({len(_COMPILED)} compiled)")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, help="write the rows here (else print them)")
    parser.add_argument("--quick", action="store_true",
                        help="only B=1/T=512/d=4096 and B=8/T=32768/d=4096, bf16, K=4")
    for name, values in GRID.items():
        parser.add_argument(f"--{name}", default=",".join(map(str, values)),
                            help=f"comma list (default {','.join(map(str, values))})")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_sass_report: unset TRITON_INTERPRET; the kernels must be compiled, not "
              "interpreted", file=sys.stderr)
        return 2
    if not tools_available():
        print("kernel_sass_report: Triton's NVIDIA backend tools (ptxas, cuobjdump) are not "
              "installed with this triton", file=sys.stderr)
        return 2
    if args.quick:
        shapes = QUICK
    else:
        pick = {n: [v if n == "dtype" else int(v) for v in getattr(args, n).split(",")]
                for n in GRID}
        shapes = list(itertools.product(*(pick[n] for n in GRID)))
    t0 = time.perf_counter()
    rows = report_rows(shapes, log=lambda s: print(s, file=sys.stderr, flush=True))
    out = open(args.csv, "w", newline="") if args.csv else sys.stdout
    with out if args.csv else contextlib.nullcontext(out):
        writer = csv.DictWriter(out, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"kernel_sass_report: {len(rows)} rows from {len(shapes)} shapes, {len(_COMPILED)} "
          f"compiles, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
