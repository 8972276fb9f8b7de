"""The PyTorch reference of the safety head against docs/design.md §2 written out by hand."""
import math

import pytest
import torch

from casa_cli.head import SafetyHead, last_valid_index, safety_head_reference


def naive_z(H, mask, Q, V, b):
    """docs/design.md §2 term by term: loops over rows, heads and valid tokens, in float64."""
    z = []
    for i in range(H.shape[0]):
        valid = [t for t in range(H.shape[1]) if mask[i, t]]
        total = float(b)
        for j in range(Q.shape[0]):
            s = [float(H[i, t] @ Q[j]) / math.sqrt(H.shape[2]) for t in valid]
            top = max(s)
            e = [math.exp(x - top) for x in s]
            total += sum(e_t / sum(e) * float(H[i, t] @ V[j]) for e_t, t in zip(e, valid))
        z.append(total)
    return torch.tensor(z, dtype=torch.float64)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    B, T, d, K = 3, 9, 16, 4
    H = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :4] = False  # left padding
    mask[1, 6:] = False  # right padding
    Q, V = torch.randn(K, d, generator=g, dtype=torch.float64), torch.randn(K, d, generator=g, dtype=torch.float64)
    b = torch.tensor(0.3, dtype=torch.float64)
    token_out = torch.randn(2, d, generator=g, dtype=torch.float64)
    return H, mask, Q, V, b, token_out


def test_last_valid_index_for_both_paddings(inputs):
    _, mask, *_ = inputs
    assert last_valid_index(mask).tolist() == [8, 5, 8]


def test_attention_score_matches_the_equations(inputs):
    H, mask, Q, V, b, token_out = inputs
    out = safety_head_reference(H, mask, Q, V, b, token_out, "log", return_weights=True)
    assert torch.allclose(out.z, naive_z(H, mask, Q, V, b), atol=1e-10)
    assert torch.allclose(out.weights.sum(1), torch.ones(3, 4, dtype=torch.float64))
    assert (out.weights[0, :4] == 0).all() and (out.weights[1, 6:] == 0).all()


def test_gates(inputs):
    H, mask, Q, V, b, token_out = inputs
    h_last = H[torch.arange(3), last_valid_index(mask)]
    l_safe, l_unsafe = (h_last @ token_out.T).unbind(-1)
    z = naive_z(H, mask, Q, V, b)
    log = safety_head_reference(H, mask, Q, V, b, token_out, "log")
    assert torch.allclose(log.p_unsafe, torch.sigmoid(l_unsafe - l_safe + z), atol=1e-10)
    multiply = safety_head_reference(H, mask, Q, V, b, token_out, "multiply")
    v = torch.sigmoid(z)
    expected = torch.softmax(torch.stack([(1 - v) * l_safe, v * l_unsafe], -1), -1)[:, 1]
    assert torch.allclose(multiply.p_unsafe, expected, atol=1e-10)
    assert torch.allclose(log.lm_log_odds, l_unsafe - l_safe)


def test_head_never_moves_the_prompt_states(inputs):
    H, mask, *_ = inputs
    head = SafetyHead(16, heads=4).double()
    H = H.clone().requires_grad_(True)
    head(H, mask, backend="torch").p_unsafe.sum().backward()
    assert H.grad is None and head.token_out.grad is not None


def test_all_padding_row_is_refused(inputs):
    H, mask, Q, V, b, token_out = inputs
    mask[2] = False
    with pytest.raises(ValueError, match=r"row\(s\) \[2\]"):
        safety_head_reference(H, mask, Q, V, b, token_out)
