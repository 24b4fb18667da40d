"""Sequential recommenders sharing one interface (see recmodels.base): SASRec, FAME, HM4SR."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recmodels.base import DataFacts, EncoderConfig, ItemFeatures, SequentialRecommender, StoreNeeds
from recmodels.fame import FAME, FAMEConfig
from recmodels.hm4sr import HM4SR, HM4SRConfig
from recmodels.sasrec import SASRec, SASRecConfig

MODELS: dict[str, type[SequentialRecommender]] = {"sasrec": SASRec, "fame": FAME, "hm4sr": HM4SR}


def create_model(name: str, config: Mapping[str, Any] | EncoderConfig | None, n_items: int,
                 features: ItemFeatures | None = None) -> SequentialRecommender:
    """Build model `name` from a config dict (unknown keys raise, naming them) or its config dataclass."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {sorted(MODELS)}")
    return MODELS[name](config, n_items, features)


__all__ = ["MODELS", "create_model", "ItemFeatures", "SequentialRecommender", "EncoderConfig", "StoreNeeds",
           "DataFacts",
           "SASRec", "SASRecConfig", "FAME", "FAMEConfig", "HM4SR", "HM4SRConfig"]
