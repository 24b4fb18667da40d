"""Pretrained item encoders, created by name (in the spirit of timm's `create_model`).

Each encoder carries its own preprocessing and reports `dim` and `version` (which go into the feature store).
"""
from encoders.registry import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, create_encoder, image_config, text_config

__all__ = ["DEFAULT_IMAGE_MODEL", "DEFAULT_TEXT_MODEL", "create_encoder", "image_config", "text_config"]
