"""Rotary embedding constants read from a model config: the one place that knows where `rope_theta` lives.

transformers 5 moved `rope_theta` into `rope_parameters`; older configs (and the official LCKV checkpoints) keep it
at the top level.  The reference model, the trainer and the engine's StreamingLLM read all build their frequencies
here so that they cannot disagree.
"""

from __future__ import annotations

import torch

DEFAULT_THETA = 10000.0


def rope_theta(config) -> float:
    """The config's RoPE base: `rope_parameters.rope_theta`, else the top-level `rope_theta`, else 10000."""
    top = getattr(config, "rope_theta", DEFAULT_THETA)
    rp = getattr(config, "rope_parameters", None) or {}
    return float(rp.get("rope_theta", top) if isinstance(rp, dict) else top)


def inv_freq(theta: float, head_dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """theta^(-2i/D) for i < D/2, the neox-style rotation speeds, computed in `dtype`."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
