"""Device placement shared by the encoders: CUDA with autocast when the actor has a GPU, CPU otherwise."""
from __future__ import annotations

import contextlib

import numpy as np
import torch


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast where the GPU supports it, fp16 otherwise; full precision on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host -> device copy; pinned memory and a non-blocking copy on CUDA."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def l2_normalize(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)
