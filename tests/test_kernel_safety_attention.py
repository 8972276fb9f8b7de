"""The fused Triton safety head against the PyTorch reference (casa_cli.head).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py). The reference runs
in float64 on the very same (already rounded) H, so the only error left is the kernel's own:
float32 accumulation and the hi/lo split of the float32 operands of its tensor-core dots
(about 16 bits of mantissa for bf16, 22 for fp16; tf32x3 for fp32 H on a GPU). Tolerances
(rtol = atol, on z, the logits, p_unsafe and the weights): fp32 1e-5, fp16 2e-5, bf16 3e-4;
on the gradients of Q, V, b and token_out: fp32 and fp16 1e-5, bf16 2e-4. The largest errors
seen were about 5x below these (bf16: 5e-5 on z, 3e-5 on dV).

Every buffer the launcher allocates is NaN-poisoned first (the `poisoned` fixture), and
padding positions of H hold NaN too, so an element the kernels fail to write, or a padding
value they read, shows up as a NaN in some output.
"""
from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
import triton.language as tl

import casa_cli.kernels.safety_attention_function as launcher
from casa_cli.head import SafetyHead, safety_attention_reference, safety_head_reference
from casa_cli.kernels import safety_attention, safety_head

TOL = {torch.float32: 1e-5, torch.float16: 2e-5, torch.bfloat16: 3e-4}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 2e-4}
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True, scope="module")
def interpreter_dot_as_on_gpu():
    """Make the interpreter's tl.dot read its operands as a GPU's tensor cores do. Triton 3.9's
    interpreter multiplies bf16 operands as their raw uint16 storage: widen them to float32
    (exact). And it multiplies float32 in full even where the kernel asks for tf32, which
    the tensor cores read to 10 mantissa bits (the low 13 bits ignored): drop those bits, so
    a kernel that feeds a tf32 dot anything not already tf32-exact loses accuracy here too."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    original = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, *args):
        a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x
                for x in (a, b))
        if input_precision == ir.INPUT_PRECISION.TF32 and a.dtype.scalar == tl.float32:
            a, b = (TensorHandle((x.data.view(np.uint32) & np.uint32(0xFFFFE000))
                                 .view(np.float32), tl.float32) for x in (a, b))
        return original(self, a, b, d, input_precision, *args)

    InterpreterBuilder.create_dot = create_dot
    yield
    InterpreterBuilder.create_dot = original


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    def empty(*shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(launcher, "_empty", empty)


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_inputs(B, T, d, K, dtype, lengths=None, left=False, seed=0):
    """Random H (B, T, d) with padding filled with NaN, its mask, and head parameters.

    Scales: scores H.Q / sqrt(d) ~ N(0, 9), so the softmax is peaked rather than uniform;
    values H.V ~ N(0, 4) and logits ~ N(0, 4), so z and p_unsafe are O(1) and not saturated.
    """
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(B, T, d, generator=g).to(dtype)
    lengths = torch.tensor(lengths if lengths is not None else [T] * B)
    pos = torch.arange(T)
    mask = (pos >= T - lengths[:, None]) if left else (pos < lengths[:, None])
    H = H.masked_fill(~mask[..., None], float("nan"))
    params = dict(Q=torch.randn(K, d, generator=g) * 3,
                  V=torch.randn(K, d, generator=g) * 2 / math.sqrt(d),
                  b=torch.randn((), generator=g),
                  token_out=torch.randn(2, d, generator=g) * 2 / math.sqrt(d))
    dev = _device()
    return H.to(dev), mask.to(dev), {k: v.to(dev) for k, v in params.items()}


def reference(H, mask, params, gate, **kw):
    """The reference in float64 on the same H values (padding zeroed: it reads them)."""
    H64 = H.double().masked_fill(~mask[..., None], 0.0)
    p64 = {k: v.double() for k, v in params.items()}
    return safety_head_reference(H64, mask, p64["Q"], p64["V"], p64["b"], p64["token_out"],
                                 gate, **kw)


def assert_close(actual, expected, tol):
    assert actual.dtype == torch.float32
    assert torch.isfinite(actual).all(), "an output element was not written (still NaN)"
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


# (B, T, d, K, dtype, gate, lengths, left padding, launch overrides): chosen to reach every
# dispatch path -- single launch (one program per row) and split + combine, with token-tile
# and d-tile tails (and d a multiple of the d tile: EVEN_D) -- and every dtype with both
# gates, T in {1, 7, 33, 45, 70, 128, 130, 300, 512, 1000, 4099}, d in {64, 100, 256, 576, 1000,
# 4096}, K in {1, 4, 5, 8, 16},
# and the d-split forward that short prompts take on a GPU
# (the forward's head tiles of 4, 8 and 16: its one Q/V operand is 16, 32 or 64 columns
# wide, 4 columns a head).
HEAD_CASES = [
    pytest.param(1, 1, 100, 1, FP32, "log", None, False, {}, id="T1-single-dtail-fp32"),
    pytest.param(4, 1, 1000, 8, BF16, "multiply", None, False, {}, id="T1-batch-dtail-bf16"),
    pytest.param(3, 7, 576, 4, FP16, "log", [7, 3, 1], True, {}, id="T7-left-fp16"),
    pytest.param(3, 7, 64, 8, BF16, "log", [5, 7, 2], False, {}, id="T7-right-bf16"),
    pytest.param(2, 128, 1000, 8, FP16, "multiply", [128, 77], True,
                 dict(block_t=16, splits=3), id="T128-split-left-fp16"),
    pytest.param(2, 128, 576, 4, FP32, "multiply", [100, 128], False,
                 dict(block_t=32, splits=2, block_d=64), id="T128-split-right-fp32"),
    pytest.param(2, 1000, 64, 4, BF16, "log", [1000, 613], False,
                 dict(block_t=32, splits=5), id="T1000-split-ttail-bf16"),
    pytest.param(2, 1000, 576, 1, FP32, "log", [999, 1000], True, dict(splits=1),
                 id="T1000-single-fp32"),
    pytest.param(1, 4099, 1000, 4, BF16, "multiply", None, False, {}, id="T4099-auto-bf16"),
    pytest.param(2, 45, 256, 5, BF16, "log", [45, 20], True, {}, id="K5-left-even-d-bf16"),
    pytest.param(2, 70, 64, 16, FP16, "multiply", [70, 33], False, dict(block_t=16, splits=2),
                 id="K16-split-fp16"),
    pytest.param(1, 33, 64, 16, FP32, "log", None, False, {}, id="K16-single-fp32"),
    # the d-split forward (partial scores and values over d, then their sum and the softmax):
    # one chunk per row, chunks + combine, a d tail, K of 1, 5 and 16
    pytest.param(2, 70, 1000, 4, BF16, "log", [70, 33], True, dict(d_splits=3),
                 id="dsplit-left-dtail-bf16"),
    pytest.param(2, 130, 256, 5, FP16, "multiply", [130, 20], False, dict(d_splits=2, splits=3),
                 id="dsplit-split-even-d-fp16"),
    pytest.param(1, 33, 64, 16, FP32, "log", None, False, dict(d_splits=2, block_d=32),
                 id="dsplit-K16-fp32"),
    pytest.param(2, 300, 256, 1, FP32, "multiply", [300, 90], True, dict(d_splits=4),
                 id="dsplit-K1-left-fp32"),  # the sum of partials tiles one head as 1, not 4
    # the plans a 132-SM GPU picks at B=1, T=512, d=4096 (plan_launch, forced here: the
    # interpreter counts one SM): 256 programs of 64 x 128 (bf16), 128 of 256 x 16 (float32)
    pytest.param(1, 512, 4096, 4, BF16, "log", None, False,
                 dict(block_t=64, block_d=128, splits=8, d_splits=32), id="gpu-plan-T512-bf16"),
    pytest.param(1, 512, 4096, 4, FP32, "log", None, False,
                 dict(block_t=256, block_d=16, splits=2, d_splits=64), id="gpu-plan-T512-fp32"),
]


@pytest.mark.parametrize("B,T,d,K,dtype,gate,lengths,left,tuning", HEAD_CASES)
def test_head_matches_reference(B, T, d, K, dtype, gate, lengths, left, tuning):
    H, mask, p = make_inputs(B, T, d, K, dtype, lengths, left, seed=T * 7 + d + K)
    out = safety_head(H, mask, p["Q"], p["V"], p["b"], p["token_out"], gate,
                      return_weights=True, **tuning)
    ref = reference(H, mask, p, gate, return_weights=True)
    for field in ("z", "l_safe", "l_unsafe", "p_unsafe", "weights"):
        assert_close(getattr(out, field), getattr(ref, field), TOL[dtype])
    assert out.weights.shape == (B, T, K)


def test_head_without_weights_and_attention_alone():
    """The inference path (no stored scores) and safety_attention, with and without a mask."""
    H, mask, p = make_inputs(2, 128, 576, 4, BF16, [128, 50], seed=1)
    ref = reference(H, mask, p, "log")
    out = safety_head(H, mask, p["Q"], p["V"], p["b"], p["token_out"], block_t=16, splits=4)
    assert out.weights is None
    assert_close(out.p_unsafe, ref.p_unsafe, TOL[BF16])
    z = safety_attention(H, p["Q"], p["V"], p["b"], mask=mask, block_t=16, splits=4)
    assert_close(z, ref.z, TOL[BF16])
    full = torch.ones_like(mask)
    z, w = safety_attention(H[:1], p["Q"], p["V"], p["b"], return_weights=True)
    ref = reference(H[:1], full[:1], p, "log", return_weights=True)
    assert_close(z, ref.z, TOL[BF16])
    assert_close(w, ref.weights, TOL[BF16])


def pack(H, mask):
    """Right-padded (B, T, d) -> packed (total_T, d) and cu_seqlens."""
    lengths = mask.sum(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=H.device)
    cu[1:] = lengths.cumsum(0)
    return H[mask], cu


@pytest.mark.parametrize("dtype,tuning", [(FP16, dict(block_t=16, splits=4)),
                                          (BF16, {}), (FP32, dict(splits=1)),
                                          (BF16, dict(d_splits=3, splits=2))])
def test_packed_matches_reference(dtype, tuning):
    H, mask, p = make_inputs(4, 300, 576, 4, dtype, [1, 7, 128, 300], seed=3)
    packed, cu = pack(H, mask)
    z, w = safety_attention(packed, p["Q"], p["V"], p["b"], cu_seqlens=cu,
                            return_weights=True, **tuning)
    ref = reference(H, mask, p, "log", return_weights=True)
    assert_close(z, ref.z, TOL[dtype])
    assert w.shape == (packed.shape[0], 4)
    assert_close(w, ref.weights[mask], TOL[dtype])


def _loss_weights(B, device):
    return torch.randn(4, B, generator=torch.Generator().manual_seed(5)).to(device)


@pytest.mark.parametrize("dtype,gate,tuning", [
    (FP32, "log", {}),
    (BF16, "multiply", dict(block_t=16, splits=3)),
    (FP16, "log", dict(block_t=32, splits=2, block_d=64)),
    (BF16, "log", dict(d_splits=2, splits=2)),
])
def test_head_gradients(dtype, gate, tuning):
    """Grads of Q, V, b, token_out through z, both logits and p_unsafe vs reference autograd."""
    B = 3
    H, mask, p = make_inputs(B, 70, 576, 4, dtype, [70, 31, 9], left=gate == "log", seed=11)
    c = _loss_weights(B, H.device)

    def grads(fn, params):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        out = fn(leaves)
        loss = (c[0] * out.z + c[1] * out.l_safe + c[2] * out.l_unsafe + c[3] * out.p_unsafe)
        loss.sum().backward()
        return {k: v.grad for k, v in leaves.items()}

    got = grads(lambda q: safety_head(H, mask, q["Q"], q["V"], q["b"], q["token_out"], gate,
                                      **tuning), p)
    H64 = H.double().masked_fill(~mask[..., None], 0.0)
    want = grads(lambda q: safety_head_reference(H64, mask, q["Q"], q["V"], q["b"],
                                                 q["token_out"], gate),
                 {k: v.double() for k, v in p.items()})
    for k in p:
        assert got[k].dtype == p[k].dtype and got[k].shape == p[k].shape
        assert_close(got[k], want[k], GRAD_TOL[dtype])


def test_packed_gradients():
    H, mask, p = make_inputs(3, 90, 64, 8, BF16, [90, 1, 40], seed=13)
    packed, cu = pack(H, mask)
    c = _loss_weights(3, H.device)[0]
    leaves = {k: p[k].clone().requires_grad_() for k in ("Q", "V", "b")}
    (c * safety_attention(packed, leaves["Q"], leaves["V"], leaves["b"], cu_seqlens=cu,
                          block_t=16, splits=2)).sum().backward()
    ref = {k: p[k].double().requires_grad_() for k in ("Q", "V", "b")}
    H64 = H.double().masked_fill(~mask[..., None], 0.0)
    (c * safety_attention_reference(H64, mask, ref["Q"], ref["V"], ref["b"])).sum().backward()
    for k in leaves:
        assert_close(leaves[k].grad, ref[k].grad, GRAD_TOL[BF16])


def _rows(out, keep):
    return {f: getattr(out, f)[keep] for f in ("z", "l_safe", "l_unsafe", "p_unsafe", "weights")}


@pytest.fixture
def sentinel_buffers(monkeypatch):
    """Buffers filled with 777 instead of NaN, so that a NaN output proves a write."""
    def empty(*shape, dtype, device):
        fill = 777 if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(launcher, "_empty", empty)


@pytest.mark.parametrize("tuning", [{}, dict(block_t=16, splits=3), dict(d_splits=2, splits=2)],
                         ids=["single", "split", "dsplit"])
def test_all_padding_row_is_nan_padded(tuning, sentinel_buffers):
    """No host check: an all-padding row comes back NaN (z, logits, p_unsafe, weights), never
    read out of bounds; every other row is exact. Gradients: a loss that leaves the row out
    gets the reference's gradients of the other rows; one that uses it gets NaN."""
    H, mask, p = make_inputs(3, 40, 64, 4, FP32, [40, 0, 13], left=True, seed=2)
    keep = torch.tensor([True, False, True], device=H.device)
    out = safety_head(H, mask, p["Q"], p["V"], p["b"], p["token_out"], "multiply",
                      return_weights=True, **tuning)
    for field, value in _rows(out, ~keep).items():
        assert torch.isnan(value).all(), field
    ref = reference(H[keep], mask[keep], p, "multiply", return_weights=True)
    for field, value in _rows(out, keep).items():
        assert_close(value, getattr(ref, field), TOL[FP32])
    z = safety_attention(H, p["Q"], p["V"], p["b"], mask=mask, **tuning)
    assert torch.isnan(z[1]) and not torch.isnan(z[keep]).any()

    c = _loss_weights(3, H.device)
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    out = safety_head(H, mask, leaves["Q"], leaves["V"], leaves["b"], leaves["token_out"],
                      "multiply", **tuning)
    terms = c[0] * out.z + c[1] * out.l_safe + c[2] * out.l_unsafe + c[3] * out.p_unsafe
    torch.where(keep, terms, 0.0).sum().backward(retain_graph=True)
    ref_leaves = {k: v.double().requires_grad_() for k, v in p.items()}
    H64 = H.double().masked_fill(~mask[..., None], 0.0)[keep]
    r = safety_head_reference(H64, mask[keep], ref_leaves["Q"], ref_leaves["V"],
                              ref_leaves["b"], ref_leaves["token_out"], "multiply")
    (c[0, keep] * r.z + c[1, keep] * r.l_safe + c[2, keep] * r.l_unsafe
     + c[3, keep] * r.p_unsafe).sum().backward()
    for k in p:
        assert_close(leaves[k].grad, ref_leaves[k].grad, GRAD_TOL[FP32])
        leaves[k].grad = None
    terms.sum().backward()  # the empty row's NaN reaches every gradient
    for k in p:
        assert torch.isnan(leaves[k].grad).any(), k


@pytest.mark.parametrize("tuning", [{}, dict(block_t=16, splits=4), dict(d_splits=2, splits=2)],
                         ids=["single", "split", "dsplit"])
def test_malformed_packed_rows_are_nan(tuning, sentinel_buffers):
    """cu_seqlens is checked on the device: an empty row, or one that ends past H, is NaN and
    reads nothing; the other rows are exact. A max_seqlen below the longest row is slower,
    never wrong; an offset list not starting at 0 makes every row NaN."""
    H, mask, p = make_inputs(4, 60, 64, 4, BF16, [60, 7, 33, 60], seed=6)
    packed, cu = pack(H, mask)  # rows of 60, 7, 33, 60 tokens
    ref = reference(H, mask, p, "log", return_weights=True)
    full = cu.clone()
    cu = cu.clone()
    cu[2] = cu[1]  # row 1 empty (row 2 takes 40 tokens: its own 33 and 7 of row 1's)
    cu[4] = packed.shape[0] + 5  # row 3 ends past H
    z, w = safety_attention(packed, p["Q"], p["V"], p["b"], cu_seqlens=cu,
                            return_weights=True, **tuning)
    assert torch.isnan(z[[1, 3]]).all()
    assert_close(z[0], ref.z[0], TOL[BF16])
    assert_close(w[:60], ref.weights[0, :60], TOL[BF16])
    H2 = H.clone()
    H2[2, :40] = packed[60:100]  # what row 2 spans now
    mask2 = mask.clone()
    mask2[2, :40] = True
    ref2 = reference(H2[2:3], mask2[2:3], p, "log", return_weights=True)
    assert_close(z[2:3], ref2.z, TOL[BF16])
    assert_close(w[60:100], ref2.weights[0, :40], TOL[BF16])

    z = safety_attention(packed, p["Q"], p["V"], p["b"], cu_seqlens=full, max_seqlen=8,
                         **tuning)  # too small a max_seqlen: still every token
    assert_close(z, ref.z, TOL[BF16])
    shifted = full.clone()
    shifted[0] = 1
    z = safety_attention(packed, p["Q"], p["V"], p["b"], cu_seqlens=shifted, **tuning)
    assert torch.isnan(z).all()

    leaves = {k: p[k].clone().requires_grad_() for k in ("Q", "V", "b")}
    c = _loss_weights(4, H.device)[0]
    z = safety_attention(packed, leaves["Q"], leaves["V"], leaves["b"], cu_seqlens=cu,
                         max_seqlen=60, **tuning)
    ok = ~torch.isnan(z)
    torch.where(ok, c * z, 0.0).sum().backward(retain_graph=True)
    ref_leaves = {k: p[k].double().requires_grad_() for k in ("Q", "V", "b")}
    Hr = torch.cat([H[:1], H2[2:3]]).double().masked_fill(
        ~torch.cat([mask[:1], mask2[2:3]])[..., None], 0.0)
    zr = safety_attention_reference(Hr, torch.cat([mask[:1], mask2[2:3]]), ref_leaves["Q"],
                                    ref_leaves["V"], ref_leaves["b"])
    (c[[0, 2]] * zr).sum().backward()
    for k in leaves:
        assert_close(leaves[k].grad, ref_leaves[k].grad, GRAD_TOL[BF16])
        leaves[k].grad = None
    (c * z).sum().backward()
    for k in leaves:
        assert torch.isnan(leaves[k].grad).any(), k


def test_debug_checks_raise(monkeypatch):
    """CASA_KERNEL_DEBUG=1: the host checks (synchronising) raise the reference's errors."""
    monkeypatch.setenv("CASA_KERNEL_DEBUG", "1")
    H, mask, p = make_inputs(3, 8, 64, 4, FP32, [8, 0, 3], seed=2)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] have no valid token"):
        safety_head(H, mask, p["Q"], p["V"], p["b"], p["token_out"])
    with pytest.raises(ValueError, match="no valid token"):
        safety_attention(H, p["Q"], p["V"], p["b"], mask=mask)
    for offsets in ([0, 8, 8, 11], [1, 3, 8], [0, 3, 9]):
        cu = torch.tensor(offsets, dtype=torch.int32, device=H.device)
        with pytest.raises(ValueError, match="no empty sequence"):
            safety_attention(H[0], p["Q"], p["V"], p["b"], cu_seqlens=cu)


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Tensor.item / tolist / __bool__ / __int__ / __float__ / __index__ raise inside: any host
    sync (or data-dependent host branch) fails. The interpreter, which plays the device, runs
    under the same patches."""
    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called")
        return method

    with monkeypatch.context() as patches:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            patches.setattr(torch.Tensor, name, refuse(name))
        yield


def test_public_calls_do_no_host_sync(monkeypatch):
    """The public kernel calls, forward and backward, padded and packed, single launch,
    split + combine and the d-split forward, with and without weights and the attention state, never synchronise with
    the host (so they can be captured in a CUDA graph), even with an all-padding row in the
    batch."""
    monkeypatch.delenv("CASA_KERNEL_DEBUG", raising=False)
    H, mask, p = make_inputs(3, 40, 64, 4, FP16, [40, 0, 13], left=True, seed=8)
    packed, cu = pack(H, mask)  # row 1 is empty here too
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    zs, states = [], []
    with no_host_sync(monkeypatch):
        for tuning in ({}, dict(block_t=16, splits=3), dict(d_splits=2, splits=2)):
            for extras in (False, True):  # the weights and the attention state, or neither
                asked = dict(return_weights=extras, return_state=extras, **tuning)
                out = safety_head(H, mask, p["Q"], p["V"], p["b"], p["token_out"], "multiply",
                                  **asked)
                zs.append(out.z)
                states.append(out.state)
                zs.append(safety_attention(H, p["Q"], p["V"], p["b"], mask=mask, **asked))
                for max_seqlen in (None, 40):
                    zs.append(safety_attention(packed, p["Q"], p["V"], p["b"], cu_seqlens=cu,
                                               max_seqlen=max_seqlen, **asked))
                out = safety_head(H, mask, leaves["Q"], leaves["V"], leaves["b"],
                                  leaves["token_out"], **asked)
                states.append(out.state)
                loss = out.z + out.l_safe + out.l_unsafe + out.p_unsafe
                torch.where(torch.isnan(out.z), 0.0, loss).sum().backward()
                z = safety_attention(packed, leaves["Q"], leaves["V"], leaves["b"],
                                     cu_seqlens=cu, **asked)
                z = z[0] if extras else z
                torch.where(torch.isnan(z), 0.0, z).sum().backward()
    states += [z[-1] for z in zs if isinstance(z, tuple)]
    zs = torch.stack([z[0] if isinstance(z, tuple) else z for z in zs])
    assert zs.shape == (24, 3)
    assert torch.isnan(zs[:, 1]).all() and torch.isfinite(zs[:, [0, 2]]).all()
    ref = reference(H[[0, 2]], mask[[0, 2]], p, "multiply")
    for z in zs:
        assert_close(z[[0, 2]], ref.z, TOL[FP16])
    states = [state for state in states if state is not None]
    assert len(states) == 15
    for state in states:  # checked in full in test_kernel_attention_state.py
        assert_close(state.z(p["b"])[[0, 2]], ref.z, TOL[FP16])
        assert torch.isnan(state.z(p["b"])[1])
    for k in p:
        assert torch.isfinite(leaves[k].grad).all(), k


def test_float64_is_reference_only():
    H, mask, p = make_inputs(1, 4, 64, 1, FP32)
    with pytest.raises(TypeError, match="float64"):
        safety_attention(H.double(), p["Q"], p["V"], p["b"], mask=mask)


def test_module_triton_backend_equals_torch():
    torch.manual_seed(0)
    head = SafetyHead(576, heads=4, gate="multiply").to(_device())
    with torch.no_grad():
        for param in head.parameters():
            param.normal_(0, 0.5)
    H, mask, _ = make_inputs(2, 33, 576, 4, FP32, [33, 20], left=True, seed=4)
    H = H.masked_fill(~mask[..., None], 0.0)  # the torch backend reads padding
    outs = [head(H, mask, backend=backend, return_weights=True) for backend in ("triton", "torch")]
    for field in ("z", "l_safe", "l_unsafe", "p_unsafe", "weights"):
        torch.testing.assert_close(getattr(outs[0], field), getattr(outs[1], field),
                                   rtol=TOL[FP32], atol=TOL[FP32])
    grads = []
    for out in outs:
        head.zero_grad()
        (out.p_unsafe.sum() + out.z.sum()).backward()
        grads.append([param.grad.clone() for param in (head.Q, head.V, head.b, head.token_out)])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=GRAD_TOL[FP32], atol=GRAD_TOL[FP32])


def test_the_reused_qv_operand_follows_every_change_of_q_and_v():
    """The launcher reuses its Q/V operand while Q and V are unchanged; an in-place write, a
    `.data` swap or new tensors must each give the reference of the new values."""
    H, mask, p = make_inputs(2, 40, 64, 4, BF16, [40, 17], seed=12)
    Q, V = p["Q"].clone(), p["V"].clone()

    def check():
        out = safety_head(H, mask, Q, V, p["b"], p["token_out"], "log")
        ref = reference(H, mask, dict(p, Q=Q, V=V), "log")
        assert_close(out.z, ref.z, TOL[BF16])

    check()
    check()  # reused
    Q.mul_(-0.5)  # in place: a version bump
    check()
    V.data = torch.randn_like(V) / 8  # storage swap, no version bump
    check()
    Q, V = Q.flip(0), V.flip(0)  # new tensors
    check()


@pytest.mark.parametrize("limit", [None, 8], ids=["strided", "copied"])
def test_h_may_be_a_view_with_a_wide_token_stride(monkeypatch, limit):
    """H sliced out of a wider tensor: read through its strides, or (past the stride the
    kernel's 32-bit tile offsets allow, MAX_TOKEN_STRIDE) copied first; same result."""
    if limit is not None:
        monkeypatch.setattr(launcher, "MAX_TOKEN_STRIDE", limit)
    wide, mask, p = make_inputs(2, 37, 128, 4, BF16, [37, 11], seed=13)
    H = wide[..., :64]  # token stride 128, features 64
    p = {k: (v[..., :64] if k in ("Q", "V", "token_out") else v) for k, v in p.items()}
    out = safety_head(H, mask, p["Q"].contiguous(), p["V"].contiguous(), p["b"],
                      p["token_out"].contiguous(), "log")
    ref = reference(H, mask, p, "log")
    for field in ("z", "l_safe", "l_unsafe", "p_unsafe"):
        assert_close(getattr(out, field), getattr(ref, field), TOL[BF16])


def test_launch_plan_splits_d_only_when_token_chunks_cannot_fill_the_gpu(monkeypatch):
    """The planner on a 132-SM GPU (H100/H200): B=1, T=512 fills it by splitting d as well as
    T; a long batch is split along T only; tiles are 64 x 128 (256 x 16 of float32 H)
    whatever the length; float32 with more than 4 heads never splits d; and the d parts
    cover d exactly, each with at least one d step."""
    monkeypatch.setattr(launcher, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    small = launcher.plan_launch(1, 512, 4096, 4, BF16, cuda)
    assert (small.block_t, small.block_d, small.splits, small.d_splits) == (64, 128, 8, 32)
    assert small.splits * small.d_splits == 256  # about 2 per SM, against 32 programs before
    big = launcher.plan_launch(8, 32768, 4096, 4, BF16, cuda)
    assert (big.block_t, big.splits, big.d_splits) == (64, 32, 1)
    # the partials may cost at most 1/8 of H's bytes: K=16 at d=576 leaves no room to split
    assert launcher.plan_launch(1, 512, 576, 16, BF16, cuda).d_splits == 1
    # K=4 allows 4 parts; 5 steps of 128 features make 3 parts of 2, 2 and 1 steps
    assert launcher.plan_launch(1, 512, 576, 4, BF16, cuda).d_splits == 3
    # float32: d is split for up to 4 heads only
    assert launcher.plan_launch(1, 512, 4096, 4, FP32, cuda).d_splits > 1
    assert launcher.plan_launch(1, 512, 4096, 8, FP32, cuda).d_splits == 1
    for rows, T, d, K, dtype in [(1, 1, 4096, 4, BF16), (1, 20, 1000, 4, FP32),
                                 (32, 512, 8192, 16, FP16), (1, 16384, 4096, 4, BF16),
                                 (3, 700, 576, 8, FP32), (2, 9000, 4096, 16, FP32)]:
        plan = launcher.plan_launch(rows, T, d, K, dtype, cuda)
        tile = (256, 16) if dtype == FP32 else (64, 128)
        assert (plan.block_t, plan.block_d) == tile and plan.num_warps == 4
        assert plan.d_chunk % plan.block_d == 0
        assert (plan.d_splits - 1) * plan.d_chunk < d <= plan.d_splits * plan.d_chunk
        assert (plan.splits - 1) * plan.chunk < T <= plan.splits * plan.chunk
