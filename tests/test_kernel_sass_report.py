"""benchmarks/kernel_sass_report.py: the SASS loop parser, the roofline arithmetic, and one
real ahead-of-time compile for sm_90 (no GPU needed; skipped without Triton's NVIDIA tools)."""
import csv
import os
import subprocess
import sys
import time

import pytest
from benchmark_scripts import load_benchmark

report = load_benchmark("kernel_sass_report")

# A cut-down `cuobjdump -sass` listing: an outer loop (0x0040..0x0100) around an inner loop
# (0x0060..0x00c0) with a tensor-core op, a separate epilogue loop without one, a forward
# branch, an FMA on the MMA pipe, and the trap self-branch after EXIT.
SASS = """
	code for sm_90a
		Function : k
        /*0000*/                   LDC R1, c[0x0][0x28] ;                /* 0x00000a00ff017b82 */
                                                                         /* 0x000ff00000000800 */
        /*0010*/                   S2R R0, SR_TID.X ;                    /* 0x0000000000007919 */
        /*0020*/               @P0 BRA 0x140 ;                           /* 0x0000000000000947 */
        /*0030*/                   HFMA2.MMA R2, -RZ, RZ, 0, 0 ;         /* 0x00000000ff027435 */
        /*0040*/                   IADD3 R3, R3, 0x1, RZ ;               /* 0x0000000103037810 */
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;         /* 0x0000000000007b1d */
        /*0060*/                   LDGSTS.E.BYPASS.128 [R4], desc[UR4][R6.64] ; /* 0x0 */
        /*0070*/                   LDSM.16.M88.4 R8, [R5] ;              /* 0x0 */
        /*0080*/                   HMMA.16816.F32.BF16 R12, R8, R10, R12 ; /* 0x0 */
        /*0090*/                   IADD3 R4, R4, 0x40, RZ ;              /* 0x0 */
        /*00a0*/                   ISETP.GE.AND P1, PT, R4, R7, PT ;     /* 0x0 */
        /*00b0*/                   NOP ;                                 /* 0x0 */
        /*00c0*/              @!P1 BRA 0x60 ;                            /* 0x0 */
        /*00d0*/                   FADD R2, R2, R12 ;                    /* 0x0 */
        /*00e0*/                   ISETP.GE.AND P2, PT, R3, R9, PT ;     /* 0x0 */
        /*00f0*/                   NOP ;                                 /* 0x0 */
        /*0100*/              @!P2 BRA 0x40 ;                            /* 0x0 */
        /*0110*/                   LDG.E R20, desc[UR4][R22.64] ;        /* 0x0 */
        /*0120*/                   HFMA2.MMA R21, R20, R20, R21 ;        /* 0x0 */
        /*0130*/               @P3 BRA 0x110 ;                           /* 0x0 */
        /*0140*/                   EXIT ;                                /* 0x0 */
        /*0150*/                   BRA 0x150;                            /* 0x0 */
"""


def test_parse_sass_reads_instructions_and_strips_predicates():
    instrs = report.parse_sass(SASS)
    assert len(instrs) == 22  # the encoding-only continuation line is not an instruction
    assert instrs[0] == report.Instr(0x0, "LDC", "LDC R1, c[0x0][0x28]")
    assert instrs[2].opcode == "BRA" and instrs[2].addr == 0x20
    assert instrs[12].text == "BRA 0x60"


def test_loops_innermost_and_steady_state():
    instrs = report.parse_sass(SASS)
    loops = report.find_loops(instrs)
    # forward branch (0x20) and the trap self-branch (0x150) are not loops
    assert sorted((l.start, l.end) for l in loops) == [(0x40, 0x100), (0x60, 0xC0), (0x110, 0x130)]
    inner = report.innermost(loops)
    assert sorted((l.start, l.end) for l in inner) == [(0x60, 0xC0), (0x110, 0x130)]
    loop = report.steady_state_loop(instrs)
    assert (loop.start, loop.end, loop.instructions) == (0x60, 0xC0, 7)
    assert loop.has_mma and loop.has_global_load
    epilogue = next(l for l in inner if l.start == 0x110)
    assert not epilogue.has_mma  # HFMA2.MMA is an FMA, not a tensor-core instruction
    assert epilogue.has_global_load
    assert epilogue.warp_load_bytes == 4 * 32  # one LDG.E: 4 bytes a lane
    assert loop.warp_load_bytes == 0  # LDGSTS copies to shared memory: not a register load
    # without a tensor-core loop the innermost loop with global loads is the steady state
    no_mma = [i for i in instrs if not i.opcode.startswith("HMMA")]
    assert report.steady_state_loop(no_mma).start == 0x60  # the longer of two loading loops
    neither = [i for i in no_mma if not i.opcode.startswith("LDGSTS")]
    assert report.steady_state_loop(neither).start == 0x110
    assert report.steady_state_loop(report.parse_sass("")) is None


def test_ldg_widths():
    assert [report.ldg_lane_bytes(op) for op in
            ("LDG.E", "LDG.E.64", "LDG.E.128.CONSTANT", "LDG.E.U8", "LDG.E.S16", "LDGSTS.E.128",
             "LDS.128", "STG.E.64")] == [4, 8, 16, 1, 2, 0, 0, 0]


def test_res_usage_parsing():
    text = ("\nResource usage:\n Common:\n  GLOBAL:11 CONSTANT[4]:8\n Function safety_fwd_kernel:\n"
            "  REG:141 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:736 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    usage = report.res_usage(text)
    assert usage["REG"] == 141 and usage["LOCAL"] == 8 and usage["SHARED"] == 1024


def test_sass_per_byte_and_roofline_arithmetic():
    # 230 instructions per warp, 4 warps, a 64 x 64 bf16 tile: 920 / 8192 bytes
    assert report.sass_per_byte(230, 4, 64 * 64 * 2) == pytest.approx(0.1123, abs=1e-4)
    # 3.35 TB/s moves 3.35e6 bytes per microsecond; + 5 us per launch
    assert report.roofline_us(3.35e9, report.BANDWIDTH_GBS["h100"]) == pytest.approx(1005.0)
    assert report.roofline_us(0, 4800.0, launches=2) == pytest.approx(10.0)
    # H bytes dominate: B=8, T=32768, d=4096 bf16 is 2 GiB of H
    moved = report.hbm_bytes("safety_fwd_kernel", "bf16", 8, 32768, 4096, 4, splits=32)
    h = 8 * 32768 * 4096 * 2
    assert h < moved < h * 1.001
    single = report.hbm_bytes("safety_fwd_kernel", "fp32", 1, 512, 576, 1, splits=1)
    assert single > 512 * 576 * 4 + 512
    assert report.hbm_bytes("safety_combine_kernel", "bf16", 1, 512, 4096, 4, 32) < 1e5
    # the d-split forward: H once, plus float32 partials (32 parts x 8 floats a token) written
    # by the first launch and read by the second
    h, parts = 512 * 4096 * 2, 512 * 32 * 8 * 4
    first = report.hbm_bytes("safety_fwd_partial_kernel", "bf16", 1, 512, 4096, 4, 8, 32)
    second = report.hbm_bytes(report.FROM_PARTIALS, "bf16", 1, 512, 4096, 4, 8, 32)
    assert h + parts < first < (h + parts) * 1.03  # + the mask, Q and V
    assert parts < second < parts * 1.01


@pytest.mark.skipif(not report.tools_available(),
                    reason="Triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed")
def test_one_real_sm90_compile_has_registers_and_no_spills(tmp_path):
    # The test session runs the kernels under the interpreter (conftest sets TRITON_INTERPRET
    # before they are defined), so the compile runs in a fresh process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "one.csv"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, report.__file__, "--csv", str(out), "--dtype", "bf16", "--B", "1",
                    "--T", "512", "--d", "4096", "--K", "4"], check=True, env=env, timeout=300,
                   capture_output=True)
    assert time.perf_counter() - t0 < 300
    rows = list(csv.DictReader(out.open()))
    # B=1, T=512 cannot fill 132 SMs with token chunks: the d-split forward, then the combine
    assert [r["kernel"] for r in rows] == [
        "safety_fwd_partial_kernel", "safety_fwd_kernel/from_partials", "safety_combine_kernel",
        "safety_bwd_kernel"]
    assert int(rows[0]["programs"]) == 256 and int(rows[0]["d_splits"]) == 32
    for r in rows:
        assert int(r["registers"]) > 0 and int(r["spill_bytes"]) == 0, r
        assert float(r["sass_per_byte"]) > 0
        assert int(r["programs"]) >= 1
