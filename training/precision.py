"""Mixed precision for training: "fp32" (default), "bf16" or "fp16" autocast of the forward pass.

bf16 is fast on CUDA and on CPUs with bf16 matrix instructions (AVX512-BF16, AMX); other CPUs emulate it,
slowly. fp16 is CUDA only and needs a gradient scaler (its small exponent range underflows gradients);
the scale restarts from its initial value on resume. Parameters and optimizer state stay float32 either
way; the losses' softmax and log-sum-exp run in float32 (see recmodels.base), and evaluation never
autocasts. The fused cross-entropy computes its gradients in forward, outside the scaler's reach: they are
softmax-weighted sums of item vectors, a few units at most, well inside fp16's range.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_problem(precision: str, uses_gpu: bool) -> str | None:
    """Why `precision` cannot run on this device kind, or None."""
    if precision not in PRECISIONS:
        return f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}"
    if precision == "fp16" and not uses_gpu:
        return "precision fp16 needs a GPU (--gpus-per-worker > 0); on CPUs use bf16"
    return None


def autocast(precision: str, device: torch.device | str):
    """The autocast context for `precision` on `device` (a no-op context for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """A gradient scaler that is active for fp16 only (enabled=False passes steps straight through)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
