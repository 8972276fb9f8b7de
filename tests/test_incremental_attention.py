"""The streaming form of the safety attention (casa_cli.head: attention_state_reference,
append_position, head_from_state) against its reference, `safety_head_reference` recomputed
on the whole sequence: for every prefix length of fresh random inputs, with left and right
padding, batched rows of different lengths, and rows that stop growing. Tolerance: 1e-5
relative in float32 (the issue's bar), 1e-12 in float64."""
import pytest
import torch

from casa_cli.head import (append_position, attention_state_reference, head_from_state,
                           safety_head_reference)

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def params(d, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # Large Q sharpens the softmax so the running maximum really moves between positions.
    Q, V = 3 * torch.randn(K, d, generator=g, dtype=dtype), torch.randn(K, d, generator=g, dtype=dtype)
    return Q, V, torch.randn((), generator=g, dtype=dtype), torch.randn(2, d, generator=g, dtype=dtype)


def close(a, b, dtype):
    torch.testing.assert_close(a, b, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,T,d,K", [(1, 1, 8, 1), (3, 37, 24, 4), (2, 65, 33, 3)])
def test_every_prefix_matches_a_full_recomputation(B, T, d, K, dtype):
    Q, V, b, token_out = params(d, K, dtype, seed=T)
    H = torch.randn(B, T, d, generator=torch.Generator().manual_seed(d), dtype=dtype)
    state = attention_state_reference(H[:, :1], torch.ones(B, 1, dtype=torch.bool), Q, V)
    for t in range(1, T + 1):
        if t > 1:
            state = append_position(state, H[:, t - 1], Q, V)
        full = safety_head_reference(H[:, :t], torch.ones(B, t, dtype=torch.bool), Q, V, b, token_out)
        step = head_from_state(state, H[:, t - 1], b, token_out, "log")
        close(step.z, full.z, dtype)
        close(step.p_unsafe, full.p_unsafe, dtype)


@pytest.mark.parametrize("gate", ["log", "multiply"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_prompts_then_decoding_in_a_batch(padding, gate):
    """A batch of prompts of different lengths (padded), then answers that grow one token at
    a time; one row's answer ends early and its state must stop changing."""
    dtype, B, T, d, K, steps = torch.float32, 4, 19, 40, 4, 12
    Q, V, b, token_out = params(d, K, dtype, seed=7)
    g = torch.Generator().manual_seed(11)
    lengths = torch.tensor([19, 5, 1, 12])
    prompt = torch.randn(B, T, d, generator=g)
    positions = torch.arange(T)[None]
    mask = (positions >= T - lengths[:, None]) if padding == "left" else (positions < lengths[:, None])
    answer = torch.randn(B, steps, d, generator=g)
    ends = torch.tensor([steps, steps, 4, steps])  # row 2 stops after 4 tokens

    state = attention_state_reference(prompt, mask, Q, V)
    for step in range(steps):
        state = append_position(state, answer[:, step], Q, V, valid=step < ends)
        for row in range(B):
            grown = min(step + 1, int(ends[row]))
            sequence = torch.cat([prompt[row][mask[row]], answer[row, :grown]])[None]
            full = safety_head_reference(sequence, torch.ones(1, sequence.shape[1], dtype=torch.bool),
                                         Q, V, b, token_out, gate)
            one = type(state)(state.m[row:row + 1], state.l[row:row + 1], state.acc[row:row + 1])
            mine = head_from_state(one, sequence[:, -1], b, token_out, gate)
            close(mine.p_unsafe, full.p_unsafe, dtype)
            close(mine.z, full.z, dtype)


def test_half_precision_states_accumulate_in_float32():
    Q, V, b, token_out = params(16, 2, torch.float32, seed=3)
    H = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    state = attention_state_reference(H[:, :4], mask[:, :4], Q, V)
    for t in range(4, 9):
        state = append_position(state, H[:, t], Q, V)
    assert state.acc.dtype == torch.float32
    close(state.z(b), safety_head_reference(H, mask, Q, V, b, token_out).z, torch.float32)


def test_a_row_with_no_valid_token_is_refused():
    Q, V, _, _ = params(8, 1, torch.float32, seed=0)
    with pytest.raises(ValueError, match="no valid token"):
        attention_state_reference(torch.randn(2, 3, 8), torch.tensor([[True] * 3, [False] * 3]), Q, V)
