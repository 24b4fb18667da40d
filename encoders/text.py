"""Text encoder: a transformers model + its tokenizer, masked mean pooling, L2-normalised float32; and its config.
torch and transformers are imported by the encoder only: the flow's driver needs the config alone."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from encoders.weights import weights_fingerprint


@dataclass(frozen=True)
class TextConfig:
    name: str
    path: str  # local directory or a transformers model name in the user's cache
    max_length: int = 256
    pooling: str = "mean"  # masked mean over tokens
    modality: str = "text"

    @cached_property
    def dim(self) -> int:
        local = Path(self.path) / "config.json"
        if local.is_file():  # a model directory whose config names the width: no transformers import needed
            width = json.loads(local.read_text()).get("hidden_size")
            if isinstance(width, int):
                return width
        from transformers import AutoConfig  # other names for it (DistilBERT's "dim") are transformers' to map

        return int(AutoConfig.from_pretrained(self.path).hidden_size)

    @cached_property
    def version(self) -> str:
        source = weights_fingerprint(self.path) if Path(self.path).exists() else "hf-cache"
        return f"{self.name}@{source}/len{self.max_length}/{self.pooling}"


class TextEncoder:
    modality = "text"

    def __init__(self, config: TextConfig, device: str | None = None):
        from transformers import AutoModel, AutoTokenizer

        from encoders.device import pick_device

        self.config = config
        self.name = config.name
        self.version = config.version
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(config.path)
        self.model = AutoModel.from_pretrained(config.path).eval().to(self.device)
        self.dim = config.dim

    def encode(self, texts: list[str]) -> np.ndarray:
        """(n,) strings -> (n, dim) float32 unit vectors."""
        import torch

        from encoders.device import autocast, l2_normalize

        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            with autocast(self.device):
                hidden = self.model(**tokens).last_hidden_state  # (n, T, dim)
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (n, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (n, dim)
            return l2_normalize(pooled)
