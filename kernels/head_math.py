"""The small, Triton-free pieces of the safety head that the kernels and the library share.

`casa_cli.head` (the library's door to the kernels) re-exports all of them; the kernels own
them so that `casa_cli.kernels` imports nothing of the library. Importing this module does
not import Triton.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

GATES = ("log", "multiply")


@dataclass
class HeadOutput:
    z: torch.Tensor  # (B,) attention score; v_s = sigmoid(z)
    l_safe: torch.Tensor  # (B,) the <|safe|> logit at h_last, before gating
    l_unsafe: torch.Tensor  # (B,) the <|unsafe|> logit at h_last, before gating
    p_unsafe: torch.Tensor  # (B,) gated probability of <|unsafe|>
    weights: torch.Tensor | None = None  # (B, T, K) attention weights, when asked for
    state: AttentionState | None = None  # the prompt's streaming attention state, when asked for

    @property
    def lm_log_odds(self) -> torch.Tensor:
        """The LM's own safety log-odds, log p(unsafe)/p(safe) without the attention."""
        return self.l_unsafe - self.l_safe


@dataclass
class AttentionState:
    """The safety attention of a sequence so far, per row and head, in the streaming form of
    softmax attention: m (B, K) the running maximum of the scores H[t].Q[k]/sqrt(d), l (B, K)
    the sum of exp(score - m), acc (B, K) the sum of exp(score - m) * H[t].V[k]. Then
    z = sum_k acc/l + b, and one more position updates all three in O(K d) without
    re-reading the prefix (docs/design.md §2). Accumulated in float32 (float64 with float64
    parameters)."""
    m: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor

    def z(self, b: torch.Tensor) -> torch.Tensor:
        return (self.acc / self.l).sum(dim=-1) + b.to(self.acc.dtype)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid position of each row: works for left and right padding."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=1)


def check_mask(mask: torch.Tensor) -> None:
    """Raise ValueError for a row with no valid token. Synchronises with the device: the
    reference and the kernels' debug path call it, the kernels' normal path never does."""
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"safety attention: row(s) {rows} have no valid token (all padding)")


def gated_logits(l_safe, l_unsafe, z, gate: str) -> torch.Tensor:
    """The two safety-step logits after gating, stacked as (..., 2) = (safe, unsafe)."""
    if gate == "log":
        return torch.stack([l_safe + F.logsigmoid(-z), l_unsafe + F.logsigmoid(z)], dim=-1)
    if gate == "multiply":
        v = torch.sigmoid(z)
        return torch.stack([(1 - v) * l_safe, v * l_unsafe], dim=-1)
    raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")
