"""Launchers and the autograd wrapper around the Triton kernels in safety_attention_triton.py.

`safety_head` is the drop-in for `casa_cli.head.safety_head_reference` (the nn.Module is
`casa_cli.head.SafetyHead`); `safety_attention` gives the attention score z alone and also
takes packed sequences. Gradients flow to Q, V, b and token_out; H is detached (docs/design.md §2:
the head never moves the prompt states).

No call here synchronises with the device (no .item(), .tolist() or bool() of a tensor), so
the calls can be captured in a CUDA graph: everything the host needs (grid, tile sizes) comes
from shapes, or from `max_seqlen` for packed input. The data is checked on the device instead:
a row with no valid token, or a packed row with malformed offsets, comes back as NaN (see
safety_attention_triton.py). Set CASA_KERNEL_DEBUG=1 to check on the host as well (this
synchronises) and raise ValueError for such input.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
import triton

from casa_cli.kernels.forward_operand import HALVES, forward_block_k, forward_operand
from casa_cli.kernels.head_math import (
    GATES, AttentionState, HeadOutput, check_mask, gated_logits, last_valid_index)
from casa_cli.kernels.safety_attention_triton import (
    GATE_LOG, GATE_MULTIPLY, GATE_NONE, safety_bwd_kernel, safety_combine_kernel,
    safety_fwd_kernel, safety_fwd_partial_kernel)

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GATE_CODES = {None: GATE_NONE, "log": GATE_LOG, "multiply": GATE_MULTIPLY}
# Enough programs in flight per SM to hide memory latency, but each still streams a long run
# of H so the split partials and the combine stay negligible.
PROGRAMS_PER_SM = 2
BLOCK_K = 16  # heads padded to one tensor-core tile width; K up to 16 is supported
COMBINE_BLOCK_D = 4096  # features of h_last the combine reads at once (8 warps: 16 a thread)
# The forward addresses H within a token tile with 32-bit offsets (token x stride + feature):
# a wider stride between tokens (a view into something larger) is copied first.
MAX_TOKEN_STRIDE = 2 ** 24

# Every buffer the launchers fill comes from here, so a test can hand out NaN-poisoned memory
# and prove that each element is written.
_empty = torch.empty


@dataclass(frozen=True)
class Tuning:
    """Overrides of the launch plan; None means the heuristic in plan_launch decides."""
    block_t: int | None = None  # tokens per tile (a power of two, 16 or more)
    block_d: int | None = None  # hidden features per tile (a power of two, 16 or more)
    splits: int | None = None  # programs per row along T (1 takes the single-launch path)
    d_splits: int | None = None  # programs per token chunk along d (1: no d-split forward)


@dataclass(frozen=True)
class LaunchPlan:
    block_t: int
    block_d: int
    splits: int  # programs per row along T
    chunk: int  # tokens per program, a multiple of block_t
    d_splits: int = 1  # programs per token chunk along d: > 1 runs the d-split forward
    d_chunk: int = 0  # features per d-split program, a multiple of block_d
    num_warps: int = 4
    num_stages: int = 3


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one at a time
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_block(name: str, value: int) -> int:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return value


def plan_launch(rows: int, max_len: int, d: int, K: int, dtype: torch.dtype,
                device: torch.device, tuning: Tuning = Tuning()) -> LaunchPlan:
    """Pick tile sizes, the split of T and the split of d so that the programs fill the GPU.

    A long single sequence is cut into many chunks along T; a large batch keeps one program
    per row (the single-launch path, no combine step). A prompt too short for that (B=1,
    T=512: 8 tiles of 64 tokens) also splits d: each chunk's features go to d_splits
    programs, which store partial scores and values, and a second launch adds them up
    (safety_fwd_partial_kernel). Parts of at most 1/8 of H's bytes keep that detour cheap.
    Tiles, the sizes that compile for sm_90 without register spills (3 stages) at the fewest
    SASS instructions per byte of H (benchmarks/kernel_sass_report.py): 64 tokens x 128
    features of 16-bit H per d step, 256 x 16 of float32 H (its hi/lo split takes registers;
    the tall tile shrinks the Q/V operand's share of each step); always on four warps. A
    16-token tile (tuning only) runs on one warp: four would share its 16 rows. Float32 H
    with more than 4 heads never splits d: its partials kernel takes 0.055-0.059
    instructions a byte at every tile that compiles without spills.
    """
    want = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), rows)  # programs wanted per row
    fp32 = dtype == torch.float32
    block_t = _check_block("block_t", tuning.block_t or (256 if fp32 else 64))
    block_d = _check_block("block_d", tuning.block_d or (16 if fp32 else 128))
    tiles = triton.cdiv(max_len, block_t)
    splits = min(max(tuning.splits or want, 1), tiles)
    chunk = triton.cdiv(tiles, splits) * block_t
    splits = triton.cdiv(max_len, chunk)
    d_blocks = triton.cdiv(d, block_d)
    cheap = max(d * dtype.itemsize // (8 * 2 * K * 4), 1)  # float32 s and v per part and token
    fill = triton.cdiv(want, tiles) if tiles < want and not (fp32 and K > 4) else 1
    d_splits = min(max(tuning.d_splits or min(fill, cheap), 1), d_blocks)
    d_chunk = triton.cdiv(d_blocks, d_splits) * block_d
    return LaunchPlan(block_t, block_d, splits, chunk, triton.cdiv(d, d_chunk), d_chunk,
                      num_warps=1 if block_t == 16 else 4)


class _Forward(NamedTuple):
    z: torch.Tensor
    l_safe: torch.Tensor | None
    l_unsafe: torch.Tensor | None
    p_unsafe: torch.Tensor | None
    weights: torch.Tensor | None
    state: torch.Tensor | None  # (3, rows, K): AttentionState's m, l and acc, when asked for
    scores: torch.Tensor | None  # (slots, K) log2-scaled scores, kept for backward
    values: torch.Tensor | None  # (slots, K) values H.V, kept for backward
    lse: torch.Tensor  # (rows, K) log2-sum-exp2 of the scores
    r: torch.Tensor  # (rows, K) attention-weighted value per head
    plan: LaunchPlan
    max_len: int


def _debug_checks() -> bool:
    """Host-side checks of the data (synchronising): only with CASA_KERNEL_DEBUG=1."""
    return os.environ.get("CASA_KERNEL_DEBUG", "") not in ("", "0")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """The debug path's check of packed offsets (synchronises)."""
    first, shortest, last = torch.stack([cu_seqlens[0], (cu_seqlens[1:] - cu_seqlens[:-1]).min(),
                                         cu_seqlens[-1]]).tolist()
    if first != 0 or shortest <= 0 or last > total:
        raise ValueError("safety attention: cu_seqlens must start at 0, increase strictly "
                         f"(no empty sequence) and end within H's {total} tokens")


class _Layout(NamedTuple):
    rows: int
    max_len: int  # T of the padded layout; max_seqlen (or an upper bound) of the packed one
    T: int  # the kernels' T: tokens per row (padded) or total tokens of H (packed)
    slots: int  # rows * T, or total_T: the length of the per-token buffers
    stride_hb: int
    stride_ht: int


def _layout(H: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
            d: int, max_seqlen: int | None) -> _Layout:
    """Shapes, strides and the planning length, from metadata only (no host sync)."""
    if cu_seqlens is not None:
        if mask is not None:
            raise ValueError("pass either mask (padded layout) or cu_seqlens (packed), not both")
        if H.dim() != 2 or H.shape[1] != d:
            raise ValueError(f"packed H must be (total_T, {d}), got {tuple(H.shape)}")
        if (cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.device != H.device
                or cu_seqlens.dtype not in (torch.int32, torch.int64)):
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor of B + 1 offsets on "
                             "H's device")
        if max_seqlen is not None and (isinstance(max_seqlen, bool)
                                       or not isinstance(max_seqlen, int) or max_seqlen < 1):
            raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
        if _debug_checks():
            _check_cu_seqlens(cu_seqlens, H.shape[0])
        total = H.shape[0]
        # max_seqlen only sizes the grid: the kernels never drop tokens past it.
        longest = min(max_seqlen, total) if max_seqlen is not None else total
        return _Layout(cu_seqlens.numel() - 1, longest, total, total, 0, H.stride(0))
    if max_seqlen is not None:
        raise ValueError("max_seqlen is for packed input (cu_seqlens)")
    if H.dim() != 3 or H.shape[2] != d:
        raise ValueError(f"H must be (B, T, {d}), got {tuple(H.shape)}")
    if mask is not None:
        if mask.shape != H.shape[:2] or mask.dtype != torch.bool or mask.device != H.device:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(H.shape[:2])} "
                             "on H's device")
        if _debug_checks():
            check_mask(mask)
    B, T, _ = H.shape
    return _Layout(B, T, T, B * T, H.stride(0), H.stride(1))


def _forward(H, mask, cu_seqlens, Q, V, b, token_out, gate, return_weights: bool,
             return_state: bool, keep_for_backward: bool, tuning: Tuning,
             max_seqlen: int | None = None) -> _Forward:
    """Validate, plan and launch the forward kernels (one launch, or two when T is split)."""
    if H.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton safety kernel needs CUDA tensors; use the reference "
                           "(backend='torch') on CPU")
    for name, t in (("H", H), ("Q", Q), ("V", V)):
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} is {t.dtype}; the kernel takes {KERNEL_DTYPES} "
                            "(float64 is for the reference only)")
    K, d = Q.shape
    if V.shape != Q.shape or not 1 <= K <= BLOCK_K or b.numel() != 1:
        raise ValueError(f"Q and V must both be (K, d) with K <= {BLOCK_K} and b one number; "
                         f"got {tuple(Q.shape)}, {tuple(V.shape)}, {tuple(b.shape)}")
    if token_out is not None and token_out.shape != (2, d):
        raise ValueError(f"token_out must be (2, {d}), got {tuple(token_out.shape)}")
    if H.stride(-1) != 1 or H.stride(-2) > MAX_TOKEN_STRIDE:
        H = H.contiguous()
    lay = _layout(H, mask, cu_seqlens, d, max_seqlen)
    plan = plan_launch(lay.rows, max(lay.max_len, 1), d, K, H.dtype, H.device, tuning)
    dev, f32 = H.device, torch.float32
    Q, V = Q.contiguous(), V.contiguous()
    z = _empty(lay.rows, device=dev, dtype=f32)
    unused = z  # stands in for pointers the compiled variant never touches
    lse, r = (_empty(lay.rows, K, device=dev, dtype=f32) for _ in range(2))
    has_head = token_out is not None
    l_safe, l_unsafe, p_unsafe = ((_empty(lay.rows, device=dev, dtype=f32) for _ in range(3))
                                  if has_head else (None, None, None))
    store_sv = return_weights or keep_for_backward
    scores, values = ((_empty(lay.slots, K, device=dev, dtype=f32) for _ in range(2))
                      if store_sv else (None, None))
    weights = _empty(lay.slots, K, device=dev, dtype=f32) if return_weights else None
    state = _empty(3, lay.rows, K, device=dev, dtype=f32) if return_state else None
    single = plan.splits == 1
    parts = lay.rows * plan.splits
    pm, pl, pa = ((unused,) * 3 if single
                  else (_empty(parts, K, device=dev, dtype=f32) for _ in range(3)))
    plast = unused if single else _empty(parts, device=dev, dtype=torch.int32)
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else unused
    tok = token_out.contiguous() if has_head else unused
    outs = tuple(unused if t is None else t
                 for t in (z, r, lse, l_safe, l_unsafe, p_unsafe, weights))
    sv = (scores, values) if store_sv else (unused, unused)
    state_out = unused if state is None else state
    cu = cu_seqlens if cu_seqlens is not None else unused
    block_k = forward_block_k(K)
    qv = forward_operand(Q, V, H.dtype, block_k)
    flags = dict(K=K, BLOCK_K=block_k, BLOCK_T=plan.block_t, BLOCK_D=plan.block_d,
                 PACKED=cu_seqlens is not None, GATE=GATE_CODES[gate],
                 WRITE_WEIGHTS=return_weights, WRITE_STATE=return_state)
    streaming = dict(HALVES=HALVES, EVEN_D=d % plan.block_d == 0,
                     HAS_MASK=mask is not None, num_warps=plan.num_warps,
                     num_stages=plan.num_stages)
    h_args = (H, lay.stride_hb, lay.stride_ht, mask_u8,
              mask_u8.stride(0) if mask is not None else 0, cu, qv)
    from_partials = plan.d_splits > 1
    psv, plane = unused, lay.slots * K
    if from_partials:
        psv = _empty(plan.d_splits, 2, lay.slots, K, device=dev, dtype=f32)
        safety_fwd_partial_kernel[(lay.rows, plan.splits, plan.d_splits)](
            *h_args, psv, plane, lay.T, d, plan.chunk, plan.d_chunk, K=K, BLOCK_K=block_k,
            BLOCK_T=plan.block_t, BLOCK_D=plan.block_d, PACKED=cu_seqlens is not None,
            **streaming)
    safety_fwd_kernel[(lay.rows, plan.splits)](
        *h_args, psv, plane, plan.d_splits, b, tok, *sv, pm, pl, pa, plast, *outs, state_out,
        lay.T, d, plan.chunk, math.log2(math.e) / math.sqrt(d), FROM_PARTIALS=from_partials,
        STORE_SV=store_sv, SINGLE=single, **streaming,
        # from partials no QV is read: heads tile as K alone (K = 1 loaded 4 lanes for 1)
        **dict(flags, BLOCK_K=triton.next_power_of_2(K) if from_partials else block_k))
    if not single:
        # The combine reads h_last and the two token rows in one wide step (two at d > 4096)
        # rather than a serial chain of 128-feature loads on the path to the verdict.
        safety_combine_kernel[(lay.rows,)](
            H, lay.stride_hb, lay.stride_ht, cu, b, tok, sv[0], pm, pl, pa, plast, *outs,
            state_out, lay.T, d, plan.splits, BLOCK_S=triton.next_power_of_2(plan.splits),
            **dict(flags, BLOCK_D=min(triton.next_power_of_2(d), COMBINE_BLOCK_D)), num_warps=8)
    if weights is not None and cu_seqlens is None:
        weights = weights.view(lay.rows, lay.max_len, K)
    return _Forward(z, l_safe, l_unsafe, p_unsafe, weights, state, scores, values, lse, r,
                    plan, max(lay.max_len, 1))


def _backward_qv(H, cu_seqlens, fwd_plan: LaunchPlan, max_len: int, tuning: Tuning, scores,
                 values, lse, r, dz) -> tuple[torch.Tensor, torch.Tensor]:
    """dQ, dV (float32, (K, d)) from one more read of H."""
    if H.stride(-1) != 1:
        H = H.contiguous()
    rows, K = lse.shape
    d = H.shape[-1]
    packed = cu_seqlens is not None
    # At most 64 tokens a tile: the backward holds two float32 coefficient tiles besides H
    # (128 float32 tokens take all 255 registers on sm_90, 64 take 176).
    block_t = min(fwd_plan.block_t, 64)
    # and at least 32 features: float32's 16-feature forward tile took 0.66-0.79 instructions
    # a byte here, against 0.39-0.45 at 32
    block_d = max(fwd_plan.block_d, 32)
    d_blocks = triton.cdiv(d, block_d)
    # The grid already spans d blocks x rows; split T only as far as needed to fill the GPU.
    want = tuning.splits or triton.cdiv(PROGRAMS_PER_SM * _sm_count(H.device), rows * d_blocks)
    tiles = triton.cdiv(max_len, block_t)
    chunk = triton.cdiv(tiles, min(max(want, 1), tiles)) * block_t
    splits = triton.cdiv(max_len, chunk)
    slabs = _empty(rows * splits, 2, K, d, device=H.device, dtype=torch.float32)
    safety_bwd_kernel[(d_blocks, rows, splits)](
        H, 0 if packed else H.stride(0), H.stride(-2),
        cu_seqlens if packed else lse,  # lse stands in for the offsets the padded variant ignores
        scores, values, lse, r, dz.float().contiguous(), slabs,
        H.shape[0] if packed else H.shape[1], d, chunk, 1.0 / math.sqrt(d),
        K=K, BLOCK_K=BLOCK_K, BLOCK_T=block_t, BLOCK_D=block_d,
        PACKED=packed, num_warps=4, num_stages=2)
    dq, dv = slabs.sum(0).unbind(0)
    return dq, dv


class SafetyAttentionFunction(torch.autograd.Function):
    """Forward: the fused kernels; backward: grads of Q, V, b and token_out (none for H)."""

    @staticmethod
    def forward(ctx, H, mask, cu_seqlens, Q, V, b, token_out, gate, return_weights,
                return_state, tuning, max_seqlen=None):
        fwd = _forward(H, mask, cu_seqlens, Q, V, b, token_out, gate, return_weights,
                       return_state, keep_for_backward=True, tuning=tuning,
                       max_seqlen=max_seqlen)
        ctx.save_for_backward(H, mask, cu_seqlens, b, token_out, fwd.scores, fwd.values,
                              fwd.lse, fwd.r, fwd.z, fwd.l_safe, fwd.l_unsafe)
        ctx.gate, ctx.tuning, ctx.plan, ctx.max_len = gate, tuning, fwd.plan, fwd.max_len
        ctx.param_dtypes = (Q.dtype, V.dtype)
        # The weights are a diagnostic and the state is for decoding: neither is a loss term.
        ctx.mark_non_differentiable(*(t for t in (fwd.weights, fwd.state) if t is not None))
        return fwd.z, fwd.l_safe, fwd.l_unsafe, fwd.p_unsafe, fwd.weights, fwd.state

    @staticmethod
    def backward(ctx, dz, dl_safe, dl_unsafe, dp_unsafe, _dweights, _dstate):
        (H, mask, cu_seqlens, b, token_out, scores, values, lse, r, z, l_safe,
         l_unsafe) = ctx.saved_tensors
        dz = torch.zeros_like(z) if dz is None else dz
        if token_out is not None:
            dl_safe = torch.zeros_like(z) if dl_safe is None else dl_safe
            dl_unsafe = torch.zeros_like(z) if dl_unsafe is None else dl_unsafe
            if dp_unsafe is not None:
                # p_unsafe depends on (z, l_safe, l_unsafe) through the gate: differentiate the
                # reference's own gating on these (B,) tensors rather than restate its calculus.
                with torch.enable_grad():
                    leaves = [t.detach().requires_grad_() for t in (z, l_safe, l_unsafe)]
                    p = torch.softmax(gated_logits(leaves[1], leaves[2], leaves[0], ctx.gate),
                                      dim=-1)[..., 1]
                    grads = torch.autograd.grad(p, leaves, dp_unsafe)
                # A row the loss does not use adds exactly 0, even an empty (NaN) row.
                gz, gs, gu = (torch.where(dp_unsafe == 0, 0.0, g) for g in grads)
                dz, dl_safe, dl_unsafe = dz + gz, dl_safe + gs, dl_unsafe + gu
        # An empty row (NaN z) adds nothing unless the loss uses it: then its gradient is NaN.
        dz = torch.where(torch.isnan(z) & (dz != 0), float("nan"), dz)
        need_q, need_v, need_b, need_tok = ctx.needs_input_grad[3:7]
        dq = dv = db = dtok = None
        if need_q or need_v:
            dq, dv = _backward_qv(H, cu_seqlens, ctx.plan, ctx.max_len, ctx.tuning, scores,
                                  values, lse, r, dz)
            dq, dv = dq.to(ctx.param_dtypes[0]), dv.to(ctx.param_dtypes[1])
        if need_b:
            db = dz.sum().reshape(b.shape).to(b.dtype)
        if need_tok:
            last = (last_valid_index(mask) if mask is not None
                    else torch.full((H.shape[0],), H.shape[1] - 1, device=H.device))
            empty = last < 0
            h_last = H[torch.arange(H.shape[0], device=H.device), last.clamp(min=0)].float()
            h_last = h_last.masked_fill(empty[:, None], 0.0)
            dl = torch.stack([dl_safe, dl_unsafe])
            dl = torch.where(empty & (dl != 0), float("nan"), dl)
            dtok = (dl @ h_last).to(token_out.dtype)
        return None, None, None, dq, dv, db, dtok, None, None, None, None, None


def _run(H, mask, cu_seqlens, Q, V, b, token_out, gate, return_weights, return_state, tuning,
         max_seqlen=None):
    """(z, l_safe, l_unsafe, p_unsafe, weights, state): HeadOutput's fields, in its order."""
    H = H.detach()
    params = (Q, V, b) if token_out is None else (Q, V, b, token_out)
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        *outs, state = SafetyAttentionFunction.apply(H, mask, cu_seqlens, Q, V, b, token_out,
                                                     gate, return_weights, return_state,
                                                     tuning, max_seqlen)
    else:
        # Inference skips autograd and stores no per-token scores unless weights are asked.
        fwd = _forward(H, mask, cu_seqlens, Q, V, b, token_out, gate, return_weights,
                       return_state, keep_for_backward=False, tuning=tuning,
                       max_seqlen=max_seqlen)
        *outs, state = fwd.z, fwd.l_safe, fwd.l_unsafe, fwd.p_unsafe, fwd.weights, fwd.state
    return (*outs, None if state is None else AttentionState(*state.unbind(0)))


def safety_attention(H, Q, V, b, mask=None, cu_seqlens=None, return_weights: bool = False, *,
                     return_state: bool = False, max_seqlen: int | None = None,
                     block_t: int | None = None, block_d: int | None = None,
                     splits: int | None = None, d_splits: int | None = None):
    """z (B,) = the CASA attention score of each sequence, in float32.

    Layouts: H (B, T, d) with an optional bool mask (B, T), True where valid (left or right
    padding; mask=None means every token is valid), or packed H (total_T, d) with cu_seqlens
    (B + 1,) int32/int64 offsets. With return_weights, also the attention weights, (B, T, K)
    or (total_T, K), float32; with return_state, also each row's AttentionState (float32
    (B, K) m, l, acc; no gradient), which casa_cli.head.append_position continues token by
    token. The result is z, or the tuple (z, weights?, state?) of what was asked for.
    block_t, block_d, splits and d_splits override the launch plan (tuning and tests).

    Nothing synchronises with the host. Packed: max_seqlen (a host int, the longest row, as in
    flash-attention's varlen API) sizes the grid; without it the grid is planned for total_T,
    correct but with idle programs when rows are short; one too small is slower, never wrong.
    Assumed of cu_seqlens, and checked on the device: cu_seqlens[0] == 0, strictly increasing,
    cu_seqlens[-1] <= total_T. A row with no valid token (all-padding mask row) or with
    offsets that break this (any malformed cu_seqlens makes at least one) gets z = NaN and
    NaN weights, and reads nothing; tokens outside [cu_seqlens[0], cu_seqlens[-1]) are
    ignored and their weight slots are not written; such a row's state is NaN as well, and
    stays NaN however many positions are appended. Check the output with torch.isnan, or
    run with CASA_KERNEL_DEBUG=1 to raise ValueError on the host instead (synchronises).
    """
    z, *_, weights, state = _run(H, mask, cu_seqlens, Q, V, b, None, None, return_weights,
                                 return_state, Tuning(block_t, block_d, splits, d_splits),
                                 max_seqlen)
    asked = (weights,) * return_weights + (state,) * return_state
    return (z, *asked) if asked else z


def safety_head(H, mask, Q, V, b, token_out, gate: str = "log", return_weights: bool = False,
                *, return_state: bool = False, block_t: int | None = None,
                block_d: int | None = None, splits: int | None = None,
                d_splits: int | None = None) -> HeadOutput:
    """Drop-in for casa_cli.head.safety_head_reference, fused: one read of H gives z, the
    safety-token logits at the last valid position and the gated p_unsafe; with
    return_state, also `state`, the prompt's AttentionState for decoding to continue
    (casa_cli.head.SafetyHead.step), from the same read.

    Unlike the reference it never synchronises with the host, so it does not raise for a row
    of mask with no valid token: that row's z, logits, p_unsafe and weights are NaN (other
    rows are unaffected), which casa_cli.head.verdict reports as an error. CASA_KERNEL_DEBUG=1
    restores the reference's ValueError (synchronises). That row's state is NaN too."""
    if gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")
    return HeadOutput(*_run(H, mask, None, Q, V, b, token_out, gate, return_weights,
                            return_state, Tuning(block_t, block_d, splits, d_splits)))
