"""Image encoder: a timm model's pooled pre-logits features, L2-normalised float32; and its config.

Preprocessing is split so that the costly part runs where it should: `preprocess` (decode-side resize and centre
crop to uint8) runs in CPU tasks next to the image fetch; `encode` (scale, normalise, forward) runs in the actor.
torch is imported by the encoder only: the flow's driver (the config) and the image-loading tasks (`preprocess`)
never load it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from encoders.weights import weights_fingerprint

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ImageConfig:
    name: str  # a timm model name
    weights_file: str | None = None  # a local state dict; None = timm's own pretrained weights (user's cache)
    input_size: int = 224
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_features: int | None = None  # the pooled feature width where known; None: read from a model timm builds
    modality: str = "image"

    @cached_property
    def dim(self) -> int:
        if self.num_features is not None:
            return self.num_features
        import timm

        return int(timm.create_model(self.name, pretrained=False).num_features)

    @cached_property
    def version(self) -> str:
        if self.weights_file:
            source = weights_fingerprint(self.weights_file)
        else:
            import timm

            source = f"timm{timm.__version__}"
        return f"{self.name}@{source}/{self.input_size}px"

    @classmethod
    def from_timm(cls, name: str) -> ImageConfig:
        """A timm model name's own preprocessing (its `pretrained_cfg`), weights from the user's timm/HF cache."""
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None:
            return cls(name=name)
        return cls(name=name, input_size=cfg.input_size[-1], crop_pct=cfg.crop_pct,
                   interpolation=cfg.interpolation or "bicubic", mean=tuple(cfg.mean), std=tuple(cfg.std))


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


def preprocess(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """Any PIL image (grayscale, 16-bit, RGBA, CMYK, palette...) -> (S, S, 3) uint8: RGB, resized and centre-cropped."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # High bit-depth grayscale: PIL's own conversion clips at 255 (a white picture); scale by the range instead.
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        image = Image.fromarray(((values - low) * (255.0 / max(high - low, 1e-6))).astype(np.uint8), mode="L")
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))  # transparent pixels become white, not black
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[-1])
        image = background
    image = image.convert("RGB")
    size = config.input_size
    scale_to = int(round(size / config.crop_pct))
    width, height = image.size
    ratio = scale_to / min(width, height)
    resized = image.resize(
        (max(size, round(width * ratio)), max(size, round(height * ratio))), _RESAMPLE[config.interpolation]
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_weights_in_order(model: torch.nn.Module, weights_file: str) -> None:
    """Load a state dict whose tensors match the model's one-to-one in order and shape, whatever their names."""
    import torch

    source = [t for k, t in torch.load(weights_file, map_location="cpu").items() if not k.endswith("num_batches_tracked")]
    target = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(source) != len(target):
        raise ValueError(f"{weights_file}: {len(source)} tensors for a model with {len(target)}")
    state = {}
    for name, tensor in zip(target, source):
        expected = model.state_dict()[name].shape
        if tensor.shape != expected:
            raise ValueError(f"{weights_file}: tensor for {name} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
        state[name] = tensor
    model.load_state_dict(state, strict=False)


class ImageEncoder:
    modality = "image"

    def __init__(self, config: ImageConfig, device: str | None = None):
        import timm
        import torch

        from encoders.device import pick_device

        self.config = config
        self.name = config.name
        self.version = config.version
        self.device = pick_device(device)
        model = timm.create_model(config.name, pretrained=config.weights_file is None)
        if config.weights_file is not None:
            load_weights_in_order(model, config.weights_file)
        self.model = model.eval().to(self.device)
        self.dim = int(model.num_features)
        if self.dim != config.dim:
            raise ValueError(f"{config.name}: the model's features are {self.dim} wide, its config says {config.dim}")
        self._mean = torch.tensor(config.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(config.std, device=self.device).view(1, 3, 1, 1) * 255.0

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return preprocess(image, self.config)

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        """(n, S, S, 3) uint8 -> (n, 3, S, S) normalised float on the device."""
        from encoders.device import to_device

        x = to_device(images, self.device).permute(0, 3, 1, 2).float()
        return (x - self._mean) / self._std

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 from `preprocess` -> (n, dim) float32 unit vectors (pooled pre-logits features)."""
        import torch

        from encoders.device import autocast, l2_normalize

        with torch.inference_mode(), autocast(self.device):
            features = self.model.forward_features(self._pixels(images))
            pooled = self.model.forward_head(features, pre_logits=True)  # (n, dim)
        return l2_normalize(pooled)

    def classify(self, images: np.ndarray) -> np.ndarray:
        """ImageNet logits, (n, 1000): proof that the pretrained weights are the ones loaded."""
        import torch

        from encoders.device import autocast

        with torch.inference_mode(), autocast(self.device):
            return self.model(self._pixels(images)).float().cpu().numpy()
