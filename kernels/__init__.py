"""Fused Triton kernels of casa, installed as `casa_cli.kernels` (docs/design.md §3).

safety_head: drop-in for casa_cli.head.safety_head_reference (z, safety-token logits,
gated p_unsafe, optional weights), differentiable in Q, V, b and token_out.
safety_attention: the attention score z alone, for padded (mask) or packed (cu_seqlens) H.

The package imports nothing of the library. Its names load lazily, so that the library can
import the Triton-free `casa_cli.kernels.head_math` where Triton is not installed.
"""
from __future__ import annotations

__all__ = ["LaunchPlan", "SafetyAttentionFunction", "Tuning", "plan_launch", "safety_attention",
           "safety_head"]


def __getattr__(name: str):
    if name in __all__:
        from casa_cli.kernels import safety_attention_function
        return getattr(safety_attention_function, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
