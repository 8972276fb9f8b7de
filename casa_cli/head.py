"""The CASA safety head (docs/design.md §2).

A small attention over the prompt's final-layer hidden states `H` gives a score `z`; the two
safety-token rows read `h_last` (the last prompt position) for the LM's own logits
`l_safe`, `l_unsafe`; a gate combines both into `p_unsafe`.

`safety_head_reference` is the PyTorch definition of the math. The fused Triton kernel in
`casa_cli.kernels` computes the same function in one read of `H`; tests and benchmarks
import this reference to check and time it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from casa_cli.inputs import InputError
from casa_cli.kernels.head_math import (  # noqa: F401 (re-exported: the library's names)
    GATES, AttentionState, HeadOutput, check_mask, gated_logits, last_valid_index)

BACKENDS = ("auto", "triton", "torch")
SAFETY_TOKENS = ("<|safe|>", "<|unsafe|>")


def _scores_and_values(H, Q, V):
    """(H.Q/sqrt(d), H.V) over the last dimension, in the accumulation dtype."""
    acc = torch.promote_types(Q.dtype, torch.float32)
    Hf = H.to(acc)
    return (Hf @ Q.to(acc).T) / math.sqrt(H.shape[-1]), Hf @ V.to(acc).T


def safety_attention_reference(H, mask, Q, V, b, return_weights: bool = False):
    """z[i] = sum_j sum_t softmax_t(H[i,t].Q[j]/sqrt(d))[t] * (H[i,t].V[j]) + b.

    H: (B, T, d) any float dtype; mask: (B, T) bool, True where valid; Q, V: (K, d); b: ().
    Accumulates in float32 (float64 if the parameters are float64).
    """
    check_mask(mask)
    scores, values = _scores_and_values(H, Q, V)  # (B, T, K)
    weights = torch.softmax(scores.masked_fill(~mask[..., None], float("-inf")), dim=1)
    z = (weights * values).sum(dim=(1, 2)) + b.to(values.dtype)
    return (z, weights) if return_weights else z


def attention_state_reference(H, mask, Q, V) -> AttentionState:
    """The streaming state of the safety attention over each row's valid positions of
    H (B, T, d): what `append_position` continues one token at a time."""
    check_mask(mask)
    scores, values = _scores_and_values(H, Q, V)  # (B, T, K)
    scores = scores.masked_fill(~mask[..., None], float("-inf"))
    m = scores.amax(dim=1)
    weights = torch.exp(scores - m[:, None])
    return AttentionState(m, weights.sum(dim=1), (weights * values).sum(dim=1))


def append_position(state: AttentionState, h, Q, V, valid=None) -> AttentionState:
    """`state` with one more position per row, h (B, d): the online-softmax update. Rows
    where `valid` (B,) is False (say, a finished answer in a batch) stay as they were."""
    score, value = _scores_and_values(h, Q, V)  # (B, K)
    m = torch.maximum(state.m, score)
    keep, new = torch.exp(state.m - m), torch.exp(score - m)
    grown = AttentionState(m, state.l * keep + new, state.acc * keep + new * value)
    if valid is None:
        return grown
    rows = valid[:, None]
    return AttentionState(*(torch.where(rows, after, before) for after, before in
                            ((grown.m, state.m), (grown.l, state.l), (grown.acc, state.acc))))


def _verdict_step(z, h_last, token_out, gate: str) -> HeadOutput:
    """The safety-token logits at h_last (B, d) and the gated p_unsafe for scores z (B,)."""
    l_safe, l_unsafe = (h_last.to(z.dtype) @ token_out.to(z.dtype).T).unbind(-1)
    p_unsafe = torch.softmax(gated_logits(l_safe, l_unsafe, z, gate), dim=-1)[..., 1]
    return HeadOutput(z, l_safe, l_unsafe, p_unsafe)


def head_from_state(state: AttentionState, h_last, b, token_out, gate: str) -> HeadOutput:
    """The head's output for a sequence whose attention state is `state` and whose newest
    position is h_last (B, d): what `safety_head_reference` gives on the whole sequence."""
    return _verdict_step(state.z(b), h_last, token_out, gate)


def safety_head_reference(H, mask, Q, V, b, token_out, gate: str = "log",
                          return_weights: bool = False) -> HeadOutput:
    """The whole head: attention score, safety-token logits at h_last, gated p_unsafe."""
    z, weights = safety_attention_reference(H, mask, Q, V, b, return_weights=True)
    h_last = H[torch.arange(H.shape[0], device=H.device), last_valid_index(mask)]
    out = _verdict_step(z, h_last, token_out, gate)
    out.weights = weights if return_weights else None
    return out


def valid_threshold(value) -> bool:
    """A usable verdict threshold: a number (not a bool) in [0, 1]. NaN fails the range test;
    it would compare false everywhere and call every prompt safe."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def check_threshold(threshold: float) -> float:
    if not valid_threshold(threshold):
        raise InputError(f"threshold {threshold!r} is not a number in [0, 1]")
    return float(threshold)


def verdict(p_unsafe: float, threshold: float) -> str:
    """'unsafe' or 'safe'; fails closed: a score that is not a finite probability cannot be
    judged and raises ValueError (the caller's record becomes an error, never 'safe')."""
    if not 0.0 <= p_unsafe <= 1.0:  # also catches NaN
        raise ValueError(f"cannot judge: the safety score is {p_unsafe} (not a finite "
                         "probability; non-finite model states?)")
    return "unsafe" if p_unsafe >= check_threshold(threshold) else "safe"


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' takes the Triton kernel on CUDA and the reference elsewhere."""
    if backend not in BACKENDS:
        raise InputError(f"unknown kernel backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and kernel_available() else "torch"
    return backend


def kernel_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class SafetyHead(nn.Module):
    """Parameters of the head: K score vectors Q, K value vectors V, bias b, and the
    output (lm_head) and input (embedding) rows of the two safety tokens."""

    def __init__(self, hidden_size: int, heads: int = 4, embed_size: int | None = None,
                 gate: str = "log", threshold: float = 0.5):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")
        self.gate, self.threshold = gate, threshold
        self.Q = nn.Parameter(torch.zeros(heads, hidden_size))
        self.V = nn.Parameter(torch.zeros(heads, hidden_size))
        self.b = nn.Parameter(torch.zeros(()))
        self.token_out = nn.Parameter(torch.zeros(2, hidden_size))
        self.token_in = nn.Parameter(torch.zeros(2, embed_size or hidden_size))

    @property
    def heads(self) -> int:
        return self.Q.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.Q.shape[1]

    def forward(self, H: torch.Tensor, mask: torch.Tensor, backend: str = "auto",
                return_weights: bool = False) -> HeadOutput:
        H = H.detach()  # stop-gradient: training never moves the prompt states through the head
        if resolve_backend(backend, H.device) == "triton":
            from casa_cli.kernels import safety_head
            return safety_head(H, mask, self.Q, self.V, self.b, self.token_out, self.gate,
                               return_weights=return_weights)
        return safety_head_reference(H, mask, self.Q, self.V, self.b, self.token_out,
                                     self.gate, return_weights=return_weights)

    # --- streaming: the verdict kept up to date while an answer is decoded ----------------
    def attention_state(self, H: torch.Tensor, mask: torch.Tensor,
                        backend: str = "auto") -> AttentionState:
        """The attention state of the prompt states H (B, T, d) under `mask`. The backend as
        in `forward`; the kernel's state carries no gradient and, not syncing with the host,
        comes back NaN for a row with no valid token where the reference raises."""
        H = H.detach()
        if resolve_backend(backend, H.device) == "triton":
            from casa_cli.kernels import safety_attention
            with torch.no_grad():  # no gradient to give: skip autograd's per-token buffers
                _, state = safety_attention(H, self.Q, self.V, self.b, mask=mask,
                                            return_state=True)
            return state
        return attention_state_reference(H, mask, self.Q, self.V)

    def step(self, state: AttentionState, h: torch.Tensor,
             valid: torch.Tensor | None = None) -> tuple[AttentionState, HeadOutput]:
        """Append the newest position h (B, d) (rows where `valid` is False stay as they
        were) and score the sequence so far: O(K d) per row, the prefix never re-read."""
        state = append_position(state, h.detach(), self.Q, self.V, valid)
        return state, head_from_state(state, h.detach(), self.b, self.token_out, self.gate)
