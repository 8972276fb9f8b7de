"""The prompt's streaming attention state from the fused kernels (`return_state=True` of
safety_head and safety_attention; SafetyHead.attention_state on the triton backend) against
casa_cli.head: attention_state_reference in float64 on the same H, and, continued token by
token with append_position, safety_head_reference recomputed on the whole sequence.

Inputs, shapes, the NaN-poisoned buffers and the interpreter's bf16 fix are those of
test_kernel_safety_attention (HEAD_CASES reaches the single launch and split + combine, every
dtype, left and right padding, T = 1 and token- and d-tile tails), on fresh seeds. Tolerances
(rtol = atol) are its TOL, on m, l, acc and on z and p_unsafe after appending: fp32 1e-5,
fp16 2e-5, bf16 3e-4. The appended positions run in float32 PyTorch, whose error is far below.
"""
from __future__ import annotations

import pytest
import torch

from casa_cli.head import (SafetyHead, append_position, attention_state_reference,
                           head_from_state, safety_head_reference)
from casa_cli.kernels import safety_attention, safety_head
from test_kernel_safety_attention import (  # noqa: F401 (the autouse fixtures apply here too)
    BF16, FP16, FP32, HEAD_CASES, TOL, assert_close, interpreter_dot_as_on_gpu,
    make_inputs, pack, poisoned, sentinel_buffers)

STATE_FIELDS = ("m", "l", "acc")


def reference_state(H, mask, params):
    """attention_state_reference in float64 on the same H values (padding zeroed: it reads
    them)."""
    H64 = H.double().masked_fill(~mask[..., None], 0.0)
    return attention_state_reference(H64, mask, params["Q"].double(), params["V"].double())


def assert_state_close(state, expected, tol):
    for field in STATE_FIELDS:
        assert getattr(state, field).shape == getattr(expected, field).shape, field
        assert_close(getattr(state, field), getattr(expected, field), tol)


@pytest.mark.parametrize("B,T,d,K,dtype,gate,lengths,left,tuning", HEAD_CASES)
def test_state_matches_reference(B, T, d, K, dtype, gate, lengths, left, tuning):
    H, mask, p = make_inputs(B, T, d, K, dtype, lengths, left, seed=T * 7 + d + K + 1)
    out = safety_head(H, mask, p["Q"], p["V"], p["b"], p["token_out"], gate,
                      return_state=True, **tuning)
    assert_state_close(out.state, reference_state(H, mask, p), TOL[dtype])
    torch.testing.assert_close(out.state.z(p["b"]), out.z, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,tuning", [(FP16, dict(block_t=16, splits=4)), (BF16, {}),
                                          (FP32, dict(splits=1)),
                                          (FP16, dict(d_splits=2, splits=2))])
def test_packed_state_matches_reference(dtype, tuning):
    H, mask, p = make_inputs(4, 130, 100, 4, dtype, [1, 7, 64, 130], seed=21)
    packed, cu = pack(H, mask)
    z, state = safety_attention(packed, p["Q"], p["V"], p["b"], cu_seqlens=cu,
                                return_state=True, max_seqlen=130, **tuning)
    assert_state_close(state, reference_state(H, mask, p), TOL[dtype])
    torch.testing.assert_close(state.z(p["b"]), z, rtol=1e-6, atol=1e-6)


# (layout, dtype, gate, launch overrides): every layout and dtype, every dispatch path.
CONTINUE_CASES = [
    ("right", FP32, "log", dict(block_t=16, splits=3)),
    ("right", FP16, "multiply", {}),
    ("left", BF16, "log", {}),
    ("left", FP16, "log", dict(block_t=16, splits=2)),
    ("packed", BF16, "multiply", dict(block_t=16, splits=3)),
    ("packed", FP32, "log", dict(splits=1)),
    ("left", BF16, "multiply", dict(d_splits=2)),
]


@pytest.mark.parametrize("layout,dtype,gate,tuning", CONTINUE_CASES)
def test_prefill_state_then_decoding_equals_the_whole_sequence(layout, dtype, gate, tuning):
    """The kernel's state of a batch of prompts (lengths 45, 17 and 1), then answers appended
    a token at a time (append_position, as SafetyHead.step does): after every token, z and
    p_unsafe equal the reference on the prompt and the answer so far."""
    B, T, d, K, steps = 3, 45, 100, 4, 5
    H, mask, p = make_inputs(B, T, d, K, dtype, [45, 17, 1], left=layout == "left", seed=33)
    if layout == "packed":
        packed, cu = pack(H, mask)
        _, state = safety_attention(packed, p["Q"], p["V"], p["b"], cu_seqlens=cu,
                                    return_state=True, max_seqlen=T, **tuning)
    else:
        state = safety_head(H, mask, p["Q"], p["V"], p["b"], p["token_out"], gate,
                            return_state=True, **tuning).state
    answer = torch.randn(B, steps, d, generator=torch.Generator().manual_seed(34))
    answer = answer.to(H.device, dtype)
    p64 = {k: v.double() for k, v in p.items()}
    for step in range(steps):
        state = append_position(state, answer[:, step], p["Q"], p["V"])
        mine = head_from_state(state, answer[:, step], p["b"], p["token_out"], gate)
        for row in range(B):
            sequence = torch.cat([H[row][mask[row]], answer[row, :step + 1]]).double()[None]
            whole = safety_head_reference(
                sequence, torch.ones(sequence.shape[:2], dtype=torch.bool, device=H.device),
                p64["Q"], p64["V"], p64["b"], p64["token_out"], gate)
            assert_close(mine.z[row:row + 1], whole.z, TOL[dtype])
            assert_close(mine.p_unsafe[row:row + 1], whole.p_unsafe, TOL[dtype])


def test_module_attention_state_dispatches_to_the_kernel():
    """SafetyHead.attention_state on the triton backend: the reference's state (no gradient,
    though the module's parameters want one), and SafetyHead.step continues it."""
    H, mask, _ = make_inputs(2, 40, 64, 4, FP32, [40, 9], left=True, seed=5)
    H = H.masked_fill(~mask[..., None], 0.0)  # the torch backend reads padding
    torch.manual_seed(1)
    head = SafetyHead(64, heads=4).to(H.device)
    with torch.no_grad():
        for param in head.parameters():
            param.normal_(0, 0.5)
    kernel = head.attention_state(H, mask, backend="triton")
    torch_state = head.attention_state(H, mask, backend="torch")
    assert not kernel.m.requires_grad
    for field in STATE_FIELDS:
        torch.testing.assert_close(getattr(kernel, field), getattr(torch_state, field).detach(),
                                   rtol=TOL[FP32], atol=TOL[FP32])
    h = torch.randn(2, 64, generator=torch.Generator().manual_seed(6)).to(H.device)
    (_, stepped), (_, reference_step) = head.step(kernel, h), head.step(torch_state, h)
    torch.testing.assert_close(stepped.p_unsafe, reference_step.p_unsafe.detach(),
                               rtol=TOL[FP32], atol=TOL[FP32])


@pytest.mark.parametrize("tuning", [{}, dict(block_t=16, splits=3)], ids=["single", "split"])
def test_state_alongside_weights_and_gradients(tuning):
    """With weights asked for too, and through the autograd wrapper (parameters that want a
    gradient): the same state, no gradient on it, and the gradients of the rest still flow."""
    H, mask, p = make_inputs(2, 50, 64, 4, BF16, [50, 23], seed=9)
    plain = safety_head(H, mask, p["Q"], p["V"], p["b"], p["token_out"], return_state=True,
                        **tuning).state
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    out = safety_head(H, mask, leaves["Q"], leaves["V"], leaves["b"], leaves["token_out"],
                      return_weights=True, return_state=True, **tuning)
    z, weights, state = safety_attention(H, leaves["Q"], leaves["V"], leaves["b"], mask=mask,
                                         return_weights=True, return_state=True, **tuning)
    for got in (out.state, state):
        assert not any(getattr(got, f).requires_grad for f in STATE_FIELDS)
        for field in STATE_FIELDS:
            torch.testing.assert_close(getattr(got, field), getattr(plain, field),
                                       rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weights, out.weights, rtol=1e-6, atol=1e-6)
    (out.p_unsafe.sum() + z.sum()).backward()
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves.values())


@pytest.mark.parametrize("tuning", [{}, dict(block_t=16, splits=4)], ids=["single", "split"])
@pytest.mark.usefixtures("sentinel_buffers")
def test_rows_without_a_valid_token_have_a_nan_state(tuning):
    """Fail closed without a host sync: an all-padding row, and packed rows with malformed
    offsets, get a NaN state (written: the buffers start at 777, not NaN) that stays NaN
    when positions are appended; the other rows are exact."""
    H, mask, p = make_inputs(3, 40, 64, 4, FP32, [40, 0, 13], left=True, seed=2)
    keep = torch.tensor([True, False, True], device=H.device)
    state = safety_head(H, mask, p["Q"], p["V"], p["b"], p["token_out"], return_state=True,
                        **tuning).state
    expected = reference_state(H[keep], mask[keep], p)
    for field in STATE_FIELDS:
        assert torch.isnan(getattr(state, field)[1]).all(), field
        assert_close(getattr(state, field)[keep], getattr(expected, field), TOL[FP32])
    grown = append_position(state, H[:, -1].nan_to_num(), p["Q"], p["V"])
    assert torch.isnan(grown.z(p["b"])[1]) and torch.isfinite(grown.z(p["b"])[keep]).all()

    packed, cu = pack(*make_inputs(3, 30, 64, 4, BF16, [30, 7, 12], seed=6)[:2])
    cu[2] = cu[1]  # row 1 empty
    cu[3] = packed.shape[0] + 5  # row 2 ends past H
    _, state = safety_attention(packed, p["Q"], p["V"], p["b"], cu_seqlens=cu,
                                return_state=True, **tuning)
    for field in STATE_FIELDS:
        assert torch.isnan(getattr(state, field)[1:]).all(), field
        assert torch.isfinite(getattr(state, field)[0]).all(), field
