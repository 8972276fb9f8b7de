"""Triton kernels of the CASA safety head (docs/design.md §2).

Forward: one streaming read of the prompt states `H`. A program owns one row (a sequence) and
one chunk of its tokens (FlashDecoding-style split along T); for each BLOCK_T tile of tokens it
walks d in BLOCK_D tiles and accumulates the 2K dot products (scores H.Q and values H.V), then
folds the tile into an online softmax per head. A row handled by a single program finishes in
the same launch (`SINGLE`); otherwise each program writes its partial softmax state and a small
combine kernel merges the chunks. Finishing a row means: z, the two safety-token logits read
at h_last (the last valid position), the gated p_unsafe, and optionally the attention weights
and the row's merged softmax state (`WRITE_STATE`: what decoding continues one token at a time,
kernels/head_math.AttentionState).

Backward: one more read of `H` gives the parameter gradients, from the per-token scores and
values the forward stored: dV[j] = sum_t g a[t,j] H[t] and
dQ[j] = scale * sum_t g a[t,j] (v[t,j] - r[j]) H[t] (g = dLoss/dz of the row).

Numerics: everything accumulates in float32. Scores are kept in log2 units (the softmax scale
is multiplied by log2(e)) so the kernels can use exp2. The dot products run on tensor cores
(`tl.dot`): a 16-bit operand is used exactly as stored and the float32 operand (Q, V, or the
backward coefficients) is split into two 16-bit halves, hi + lo, so it keeps about 16 bits of
mantissa (float32 H: tf32 halves). In the forward the launcher does the split once per call
(forward_operand.py): Q and V become one operand QV (d, 4 BLOCK_K) in H's dtype, columns
[q_hi, q_lo, v_hi, v_lo] per head, so each d step is one load of H, one load of QV and ONE dot
(float32 H: two, on its own tf32 hi and lo, against QV stored transposed, d contiguous, the
only order a tf32 wgmma reads), and the halves are summed once per token tile
(`_scores_and_values`). The backward's float32 H uses tf32x3, the same idea done by the
compiler.

Short prompts (too few 64-token tiles to fill the GPU: B=1, T=512 has 8) split d as well:
safety_fwd_partial_kernel projects each tile over one part of d and stores the partial scores
and values (float32, at most 1/8 of H's bytes), and safety_fwd_kernel (FROM_PARTIALS) sums the
parts and runs the same softmax as from H; so every tile is 64 tokens (128 of float32 H)
on four warps.

No host synchronisation: nothing about the data is checked on the host. A row with no valid
token (all padding, or a packed row whose offsets are malformed) is finished with NaN in z,
the safety-token logits, p_unsafe and its weights, and never reads out of bounds; the caller
sees the NaN after the fact (casa_cli.head.verdict turns it into an error, never a verdict).

The Python launchers and the autograd wrapper live in safety_attention_function.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

GATE_NONE, GATE_LOG, GATE_MULTIPLY = 0, 1, 2


@triton.jit
def _dot_keep_fp32(x, w, acc):
    """acc + x @ w, where x keeps its storage dtype and w is float32.

    K = 1..8 columns is too thin for a plain 16-bit dot to be accurate (w would be rounded to
    bf16) and a broadcast-multiply-sum would put 16 FMAs per element of H on the CUDA cores,
    near their peak at H100 bandwidth; two tensor-core dots on w's hi and lo halves cost
    neither.
    """
    if x.dtype == tl.float32:
        acc = tl.dot(x, w, acc, input_precision="tf32x3")
    else:
        w_hi = w.to(x.dtype)
        w_lo = (w - w_hi.to(tl.float32)).to(x.dtype)
        acc = tl.dot(x, w_hi, acc)
        acc = tl.dot(x, w_lo, acc)
    return acc


@triton.jit
def _scores_and_values(acc, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                       HALVES: tl.constexpr):
    """(H.Q, H.V), each (BLOCK_T, BLOCK_K), from the one dot against QV: column
    (2k + i) HALVES + j holds head k's q (i = 0) or v (i = 1), its hi (j = 0) or lo (j = 1)
    half."""
    halves = tl.reshape(acc, (BLOCK_T, BLOCK_K, 2, HALVES))
    return tl.split(tl.sum(halves, axis=3))


@triton.jit
def _row_span(row, CU, T, PACKED: tl.constexpr):
    """(first token of the row in H, number of token slots, first slot in per-token buffers).

    Padded layout: H is (B, T, d), every row has T slots and the mask says which are valid.
    Packed layout: H is (T, d) -- T is the total token count here -- and row i is tokens
    cu_seqlens[i]:cu_seqlens[i+1]. The offsets are checked on the device, never on the host:
    a row is well formed when cu_seqlens[0] == 0 and 0 <= start < end <= T; any other row gets
    length 0 (it reads nothing and is finished as NaN). Offsets that are not increasing always
    leave at least one such row (some end <= start).
    """
    if PACKED:
        first = tl.load(CU)
        start = tl.load(CU + row)
        end = tl.load(CU + row + 1)
        ok = (first == 0) & (start >= 0) & (end > start) & (end <= T)
        tok0 = tl.where(ok, start, 0).to(tl.int64)
        length = tl.where(ok, end - start, 0).to(tl.int32)
        slot0 = tok0
    else:
        tok0 = 0
        length = T
        slot0 = row.to(tl.int64) * T
    return tok0, length, slot0


@triton.jit
def _chunk_bounds(split, chunk, length, PACKED: tl.constexpr, last_split):
    """Tokens [t_begin, t_end) of split `split`. Packed, the last split also takes any tokens
    past splits * chunk, so a max_seqlen below the true longest row costs time, never
    correctness."""
    t_begin = split * chunk
    t_end = tl.minimum(t_begin + chunk, length)
    if PACKED:
        t_end = tl.where(split == last_split, length, t_end)
    return t_begin, t_end


@triton.jit
def _token_tile(MASK_row, t0, t_end, BLOCK_T: tl.constexpr, HAS_MASK: tl.constexpr):
    """(positions, in this chunk, valid) of the token tile starting at t0."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    in_chunk = offs_t < t_end
    valid = in_chunk
    if HAS_MASK:
        valid = valid & (tl.load(MASK_row + offs_t, mask=in_chunk, other=0) != 0)
    return offs_t, in_chunk, valid


@triton.jit
def _tile_projections(h_tile, stride_ht, QV, valid, d_begin, d_end, d,
                      BLOCK_K: tl.constexpr, HALVES: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """(H.Q, H.V), each (BLOCK_T, BLOCK_K), of one token tile over features [d_begin, d_end):
    per d step one load of H, one of the launcher's QV operand (d, 2 HALVES BLOCK_K, or its
    transpose for float32 H; see the module notes) and one dot."""
    offs_n = tl.arange(0, 2 * HALVES * BLOCK_K)
    offs_dd = tl.arange(0, BLOCK_D)
    # Offsets within one tile, 32-bit (a tile spans BLOCK_T tokens; the launcher copies an H
    # whose token stride could overflow them); the d step moves scalar 64-bit pointers
    # instead, so the loop's per-element integer work is one add.
    h_offs = tl.arange(0, BLOCK_T)[:, None] * stride_ht + offs_dd[None, :]
    h_step = h_tile + d_begin
    if h_tile.dtype.element_ty == tl.float32:
        # QV^T: the tf32 wgmma reads its B operand K-major only; stored (d, N), each of its
        # elements was one 4-byte load a step, where d-contiguous rows load 16 bytes at once
        w_offs = offs_n[None, :] * d + offs_dd[:, None]
        w_feature = 1  # QV's elements from one feature to the next
    else:
        w_offs = offs_dd[:, None] * (2 * HALVES * BLOCK_K) + offs_n[None, :]
        w_feature = 2 * HALVES * BLOCK_K
    w_step = QV + (tl.zeros([], tl.int64) + d_begin) * w_feature
    acc = tl.zeros([BLOCK_T, 2 * HALVES * BLOCK_K], tl.float32)
    for d0 in range(d_begin, d_end, BLOCK_D):
        # Padding tokens are never read: a masked-off lane issues no memory traffic, and
        # whatever the padding holds (even NaN) cannot leak into the sums.
        if EVEN_D:  # no d tail: only the token mask, fixed for the whole tile
            h = tl.load(h_step + h_offs, mask=valid[:, None], other=0.0)
            w = tl.load(w_step + w_offs)
        else:
            d_ok = offs_dd < d - d0
            h = tl.load(h_step + h_offs, mask=valid[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_step + w_offs, mask=d_ok[:, None], other=0.0)
        if h.dtype == tl.float32:
            # H = hi + lo, each exact in tf32 (hi: the top 11 significant bits, lo: the rest
            # but 2); QV's halves are tf32 already, so two tf32 dots keep about 22 bits with
            # two ALU ops per element of H (tf32x3 also rounds and re-splits QV every step).
            h_hi = (h.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
            acc = tl.dot(h_hi, w, acc, input_precision="tf32")
            acc = tl.dot(h - h_hi, w, acc, input_precision="tf32")
        else:
            acc = tl.dot(h, w, acc)
        h_step += BLOCK_D
        w_step += BLOCK_D * w_feature
    return _scores_and_values(acc, BLOCK_T, BLOCK_K, HALVES)


@triton.jit
def _attend_chunk(H_row, stride_ht, MASK_row, QV, PSV_row, psv_plane, d_splits, S_row,
                  VAL_row, d, t_begin, t_end, qk_scale, K: tl.constexpr,
                  BLOCK_K: tl.constexpr, HALVES: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_MASK: tl.constexpr,
                  STORE_SV: tl.constexpr, FROM_PARTIALS: tl.constexpr):
    """Online softmax over tokens [t_begin, t_end) of one row. The scores and values come
    from H (`_tile_projections` over all of d) or, FROM_PARTIALS, from the sums of the
    d-split partials (safety_fwd_partial_kernel; PSV_row is this row's slot 0 of plane 0).

    Returns per head: the running max m (log2 units), the sum of exp2(s - m), the sum of
    exp2(s - m) * value, and the last valid position seen (-1 if none).
    """
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    m_i = tl.full([BLOCK_K], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_K], tl.float32)
    a_i = tl.zeros([BLOCK_K], tl.float32)
    last = tl.full([], -1, tl.int32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t, in_chunk, valid = _token_tile(MASK_row, t0, t_end, BLOCK_T, HAS_MASK)
        sv_off = offs_t[:, None] * K + offs_k[None, :]
        if FROM_PARTIALS:
            ok = valid[:, None] & k_ok[None, :]
            s = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
            v = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
            part = PSV_row
            for _ in range(0, d_splits):
                s += tl.load(part + sv_off, mask=ok, other=0.0)
                v += tl.load(part + psv_plane + sv_off, mask=ok, other=0.0)
                part += 2 * psv_plane
        else:
            # 64-bit (T * d may pass 2^31); written so as to widen a plain int as well
            h_tile = H_row + (tl.zeros([], tl.int64) + t0) * stride_ht
            s, v = _tile_projections(h_tile, stride_ht, QV, valid, 0, d, d, BLOCK_K, HALVES,
                                     BLOCK_T, BLOCK_D, EVEN_D)
        s = tl.where(valid[:, None], s * qk_scale, float("-inf"))
        if STORE_SV:
            sv_ok = in_chunk[:, None] & k_ok[None, :]
            tl.store(S_row + sv_off, s, mask=sv_ok)
            tl.store(VAL_row + sv_off, v, mask=sv_ok)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        # Until a head has seen a valid token its max is -inf; rescale against 0 instead so
        # that exp2(-inf - -inf) never makes a NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        a_i = a_i * alpha + tl.sum(p * v, axis=0)
        m_i = m_new
        last = tl.maximum(last, tl.max(tl.where(valid, offs_t, -1), axis=0))
    return m_i, l_i, a_i, last


@triton.jit
def _finish_row(row, m, l, a, last, Bias, H_row, stride_ht, TOK, S_row, W_row, length, d,
                Z, R, LSE, LS, LU, P, STATE, K: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, GATE: tl.constexpr,
                WRITE_WEIGHTS: tl.constexpr, WRITE_STATE: tl.constexpr):
    """From a row's merged softmax state: z, the saved statistics, and the fused epilogue.

    A row without a valid token (last = -1) is finished as NaN (z, logits, p_unsafe, weights,
    state) with neutral statistics (r = lse = 0: it adds nothing to the backward unless its
    output gradient is nonzero, which the launcher turns into NaN); h_last is then not read.
    STATE (3, rows, K) receives m, l and a, with m in natural-log units as AttentionState
    keeps it; an empty row's NaN state keeps every position appended to it NaN (fail closed).
    """
    offs_k = tl.arange(0, BLOCK_K)
    empty = last < 0
    k_ok = offs_k < K
    # Padding heads (k >= K) and empty rows may have seen nothing: keep the statistics finite.
    keep = k_ok & (last >= 0)
    r = tl.where(keep, a / tl.where(keep, l, 1.0), 0.0)
    z = tl.sum(r, axis=0) + tl.load(Bias).to(tl.float32)
    z = tl.where(empty, float("nan"), z)
    lse = tl.where(keep, m + tl.log2(tl.where(keep, l, 1.0)), 0.0)
    tl.store(Z + row, z)
    tl.store(R + row * K + offs_k, r, mask=k_ok)
    tl.store(LSE + row * K + offs_k, lse, mask=k_ok)
    if WRITE_STATE:
        state = STATE + row * K + offs_k
        plane = tl.num_programs(0) * K  # rows * K: one (rows, K) plane each for m, l and a
        m_natural = m * 0.6931471805599453  # log2 units (scores times log2 e) -> natural: ln 2
        tl.store(state, tl.where(empty, float("nan"), m_natural), mask=k_ok)
        tl.store(state + plane, tl.where(empty, float("nan"), l), mask=k_ok)
        tl.store(state + 2 * plane, tl.where(empty, float("nan"), a), mask=k_ok)
    if GATE != 0:
        # The two safety-token logits: lm_head rows of <|safe|> and <|unsafe|> at h_last.
        # Clamped, and not loaded at all for an empty row (h_end = 0): never out of bounds.
        h_last = H_row + tl.maximum(last, 0).to(tl.int64) * stride_ht
        h_end = tl.where(empty, 0, d)
        acc_safe = tl.zeros([BLOCK_D], tl.float32)
        acc_unsafe = tl.zeros([BLOCK_D], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < d
            h = tl.load(h_last + offs_d, mask=offs_d < h_end, other=0.0).to(tl.float32)
            acc_safe += h * tl.load(TOK + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            acc_unsafe += h * tl.load(TOK + d + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        l_safe = tl.where(empty, float("nan"), tl.sum(acc_safe, axis=0))
        l_unsafe = tl.where(empty, float("nan"), tl.sum(acc_unsafe, axis=0))
        # p_unsafe = softmax(l_safe', l_unsafe')[1] = sigmoid(l_unsafe' - l_safe').
        if GATE == 1:  # log gate: the two log-sigmoids differ by exactly z
            x = l_unsafe - l_safe + z
        else:  # multiply gate
            v_s = tl.sigmoid(z)
            x = v_s * l_unsafe - (1.0 - v_s) * l_safe
        tl.store(LS + row, l_safe)
        tl.store(LU + row, l_unsafe)
        tl.store(P + row, tl.sigmoid(x))
    if WRITE_WEIGHTS:
        # Renormalise the stored scores: weight = exp2(s - lse); padding (s = -inf) gives 0.
        for t0 in range(0, length, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            ok = (offs_t < length)[:, None] & k_ok[None, :]
            off = offs_t[:, None] * K + offs_k[None, :]
            s = tl.load(S_row + off, mask=ok, other=float("-inf"))
            tl.store(W_row + off, tl.where(empty, float("nan"), tl.exp2(s - lse[None, :])),
                     mask=ok)


@triton.jit
def safety_fwd_kernel(H, stride_hb, stride_ht, MASK, stride_mb, CU, QV, PSV, psv_plane,
                      d_splits, Bias, TOK, S, VAL, PM, PL, PA, PLAST, Z, R, LSE, LS, LU, P, W,
                      STATE, T, d, chunk, qk_scale,
                      K: tl.constexpr, BLOCK_K: tl.constexpr, HALVES: tl.constexpr,
                      EVEN_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_MASK: tl.constexpr, FROM_PARTIALS: tl.constexpr,
                      PACKED: tl.constexpr, STORE_SV: tl.constexpr, SINGLE: tl.constexpr,
                      GATE: tl.constexpr, WRITE_WEIGHTS: tl.constexpr,
                      WRITE_STATE: tl.constexpr):
    """Grid (rows, splits): program (row, split) streams tokens [split*chunk, +chunk) of row
    (from H, or FROM_PARTIALS from the d-split partials of those tokens).

    T: tokens per row (padded), or the total tokens of H (packed).
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    tok0, length, slot0 = _row_span(row, CU, T, PACKED)
    H_row = H + row.to(tl.int64) * stride_hb + tok0 * stride_ht
    S_row = S + slot0 * K
    t_begin, t_end = _chunk_bounds(split, chunk, length, PACKED, tl.num_programs(1) - 1)
    m, l, a, last = _attend_chunk(H_row, stride_ht, MASK + row.to(tl.int64) * stride_mb, QV,
                                  PSV + slot0 * K, psv_plane, d_splits, S_row,
                                  VAL + slot0 * K, d, t_begin, t_end, qk_scale, K, BLOCK_K,
                                  HALVES, BLOCK_T, BLOCK_D, EVEN_D, HAS_MASK, STORE_SV,
                                  FROM_PARTIALS)
    if SINGLE:
        if WRITE_WEIGHTS:
            tl.debug_barrier()  # the scores this program stored are read back by other threads
        _finish_row(row, m, l, a, last, Bias, H_row, stride_ht, TOK, S_row, W + slot0 * K,
                    length, d, Z, R, LSE, LS, LU, P, STATE, K, BLOCK_K, BLOCK_T, BLOCK_D,
                    GATE, WRITE_WEIGHTS, WRITE_STATE)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        part = row * tl.num_programs(1) + split
        tl.store(PM + part * K + offs_k, m, mask=k_ok)
        tl.store(PL + part * K + offs_k, l, mask=k_ok)
        tl.store(PA + part * K + offs_k, a, mask=k_ok)
        tl.store(PLAST + part, last)


@triton.jit
def safety_fwd_partial_kernel(H, stride_hb, stride_ht, MASK, stride_mb, CU, QV, PSV,
                              psv_plane, T, d, chunk, d_chunk, K: tl.constexpr,
                              BLOCK_K: tl.constexpr, HALVES: tl.constexpr,
                              EVEN_D: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
                              PACKED: tl.constexpr):
    """Grid (rows, splits, d_splits): the first half of the d-split forward, for prompts too
    short to fill the GPU with token chunks alone. Program (row, split, part) projects tokens
    [split*chunk, +chunk) onto Q and V over features [part*d_chunk, +d_chunk) and stores the
    partial scores and values in PSV (d_splits, 2, slots, K): planes of psv_plane = slots * K;
    safety_fwd_kernel (FROM_PARTIALS) adds the parts up and runs the softmax. Padding tokens
    are not read and store 0."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    part = tl.program_id(2)
    tok0, length, slot0 = _row_span(row, CU, T, PACKED)
    H_row = H + row.to(tl.int64) * stride_hb + tok0 * stride_ht
    MASK_row = MASK + row.to(tl.int64) * stride_mb
    t_begin, t_end = _chunk_bounds(split, chunk, length, PACKED, tl.num_programs(1) - 1)
    d_begin = part * d_chunk
    d_end = tl.minimum(d_begin + d_chunk, d)
    out = PSV + part.to(tl.int64) * 2 * psv_plane + slot0 * K
    offs_k = tl.arange(0, BLOCK_K)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t, in_chunk, valid = _token_tile(MASK_row, t0, t_end, BLOCK_T, HAS_MASK)
        h_tile = H_row + (tl.zeros([], tl.int64) + t0) * stride_ht
        s, v = _tile_projections(h_tile, stride_ht, QV, valid, d_begin, d_end, d, BLOCK_K,
                                 HALVES, BLOCK_T, BLOCK_D, EVEN_D)
        off = offs_t[:, None] * K + offs_k[None, :]
        ok = in_chunk[:, None] & (offs_k < K)[None, :]
        tl.store(out + off, s, mask=ok)
        tl.store(out + psv_plane + off, v, mask=ok)


@triton.jit
def safety_combine_kernel(H, stride_hb, stride_ht, CU, Bias, TOK, S, PM, PL, PA, PLAST,
                          Z, R, LSE, LS, LU, P, W, STATE, T, d, n_splits,
                          K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PACKED: tl.constexpr,
                          GATE: tl.constexpr, WRITE_WEIGHTS: tl.constexpr,
                          WRITE_STATE: tl.constexpr):
    """Grid (rows,): merge a row's per-chunk softmax states, then finish the row."""
    row = tl.program_id(0)
    tok0, length, slot0 = _row_span(row, CU, T, PACKED)
    offs_s = tl.arange(0, BLOCK_S)
    offs_k = tl.arange(0, BLOCK_K)
    s_ok = offs_s < n_splits
    ok = s_ok[:, None] & (offs_k < K)[None, :]
    part = (row * n_splits + offs_s)[:, None] * K + offs_k[None, :]
    m = tl.load(PM + part, mask=ok, other=float("-inf"))
    m_row = tl.max(m, axis=0)
    # Chunks with no valid token carry m = -inf and l = a = 0: their rescale factor is 0.
    rescale = tl.exp2(m - tl.where(m_row == float("-inf"), 0.0, m_row)[None, :])
    l = tl.sum(tl.load(PL + part, mask=ok, other=0.0) * rescale, axis=0)
    a = tl.sum(tl.load(PA + part, mask=ok, other=0.0) * rescale, axis=0)
    last = tl.max(tl.load(PLAST + row * n_splits + offs_s, mask=s_ok, other=-1), axis=0)
    _finish_row(row, m_row, l, a, last, Bias, H + row.to(tl.int64) * stride_hb + tok0 * stride_ht,
                stride_ht, TOK, S + slot0 * K, W + slot0 * K, length, d, Z, R, LSE, LS, LU, P,
                STATE, K, BLOCK_K, BLOCK_T, BLOCK_D, GATE, WRITE_WEIGHTS, WRITE_STATE)


@triton.jit
def safety_bwd_kernel(H, stride_hb, stride_ht, CU, S, VAL, LSE, R, G, DW, T, d, chunk, scale,
                      K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_D: tl.constexpr, PACKED: tl.constexpr):
    """Grid (d blocks, rows, splits): the share of dQ and dV from one chunk of one row, for
    one block of d. Chunk (row, split) owns slab row * splits + split of DW (rows * splits, 2,
    K, d), filled by its d blocks; the launcher sums the slabs (deterministic, no atomics).
    T as in safety_fwd_kernel: tokens per row (padded) or total tokens of H (packed).
    """
    pid_d = tl.program_id(0)
    row = tl.program_id(1)
    split = tl.program_id(2)
    tok0, length, slot0 = _row_span(row, CU, T, PACKED)
    H_row = H + row.to(tl.int64) * stride_hb + tok0 * stride_ht
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    offs_tt = tl.arange(0, BLOCK_T)
    lse = tl.load(LSE + row * K + offs_k, mask=k_ok, other=0.0)
    r = tl.load(R + row * K + offs_k, mask=k_ok, other=0.0)
    g = tl.load(G + row)
    t_begin, t_end = _chunk_bounds(split, chunk, length, PACKED, tl.num_programs(2) - 1)
    dq = tl.zeros([BLOCK_D, BLOCK_K], tl.float32)
    dv = tl.zeros([BLOCK_D, BLOCK_K], tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + offs_tt
        sv_ok = (offs_t < t_end)[:, None] & k_ok[None, :]
        sv_off = (slot0 + offs_t[:, None]) * K + offs_k[None, :]
        s = tl.load(S + sv_off, mask=sv_ok, other=float("-inf"))
        v = tl.load(VAL + sv_off, mask=sv_ok, other=0.0)
        coef_v = g * tl.exp2(s - lse[None, :])  # g * attention weight; 0 on padding
        coef_q = coef_v * (v - r[None, :]) * scale
        # A padding token has every score -inf; skip its H, which may hold anything.
        valid = tl.max(s, axis=1) > float("-inf")
        h = tl.load(H_row + offs_t.to(tl.int64)[:, None] * stride_ht + offs_d[None, :],
                    mask=valid[:, None] & d_ok[None, :], other=0.0)
        h_t = tl.trans(h)
        dq = _dot_keep_fp32(h_t, coef_q, dq)
        dv = _dot_keep_fp32(h_t, coef_v, dv)
    # A NaN output gradient (the launcher's mark of an empty row that the loss used) poisons
    # the slab even where the row has no token to read.
    poison = tl.where(g == g, 0.0, g)
    dq += poison
    dv += poison
    slab = row * tl.num_programs(2) + split
    out = DW + slab.to(tl.int64) * 2 * K * d + offs_k[None, :] * d + offs_d[:, None]
    ok = d_ok[:, None] & k_ok[None, :]
    tl.store(out, dq, mask=ok)
    tl.store(out + K * d, dv, mask=ok)
