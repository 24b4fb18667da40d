import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from encoders import create_encoder, image_config, text_config
from encoders.image import ImageEncoder, preprocess
from encoders.registry import UnknownEncoderError


@pytest.fixture(scope="module")
def image_encoder():
    return create_encoder("tf_efficientnet_lite0", "image", device="cpu")


@pytest.fixture(scope="module")
def text_encoder():
    return create_encoder("all-MiniLM-L6-v2", "text", device="cpu")


def test_image_weights_are_the_pretrained_imagenet_ones(image_encoder):
    photos = np.stack([image_encoder.preprocess(Image.fromarray(p)) for p in (skimage.data.chelsea(), skimage.data.coffee())])
    predicted = image_encoder.classify(photos).argmax(1)
    assert 281 <= predicted[0] <= 285, f"chelsea classified as ImageNet class {predicted[0]}, not a cat"
    assert predicted[1] == 967, f"coffee classified as ImageNet class {predicted[1]}, not espresso"


def test_image_embeddings_are_unit_pooled_features(image_encoder):
    photos = np.stack([image_encoder.preprocess(Image.fromarray(p)) for p in
                       (skimage.data.chelsea(), skimage.data.cat(), skimage.data.rocket())])
    emb = image_encoder.encode(photos)
    assert emb.shape == (3, 1280) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # chelsea and cat are the same photo family: closer to each other than to a rocket
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "I;16", "F", "1"])
def test_unusual_modes_are_converted_not_rejected(mode):
    config = image_config("tf_efficientnet_lite0")
    if mode in ("I;16", "F"):  # 16-bit and float grayscale, as scientific and medical images come
        values = skimage.data.camera().astype(np.uint16) * 200
        image = Image.fromarray(values if mode == "I;16" else values.astype(np.float32))
    else:
        image = Image.fromarray(skimage.data.astronaut()).convert(mode)
    pixels = preprocess(image, config)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 5  # a real picture, not a blank


def test_preprocess_keeps_aspect_and_centre_crops():
    config = image_config("tf_efficientnet_lite0")
    wide = np.zeros((100, 400, 3), np.uint8)
    wide[:, 180:220] = 255  # a narrow white band in the centre
    pixels = preprocess(Image.fromarray(wide), config)
    assert pixels[:, 112].mean() > 200 and pixels[:, 0].mean() < 30


def test_text_embeddings_rank_related_titles_higher(text_encoder):
    emb = text_encoder.encode(["space adventure", "Star Wars: a galactic war among the stars", "a cookbook of soups"])
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.1


def test_text_matches_sentence_transformers_reference(text_encoder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(text_encoder.config.path, device="cpu").encode(
        ["Toy Story (1995)", "a longer sentence about animated toys"], normalize_embeddings=True)
    np.testing.assert_allclose(text_encoder.encode(["Toy Story (1995)", "a longer sentence about animated toys"]),
                               reference, atol=1e-5)


def test_versions_name_the_weights():
    assert text_config("all-MiniLM-L6-v2").version.startswith("all-MiniLM-L6-v2@")
    assert image_config("tf_efficientnet_lite0").version == image_config("tf_efficientnet_lite0").version
    assert image_config("tf_efficientnet_lite0").dim == 1280 and text_config("all-MiniLM-L6-v2").dim == 384


def test_a_declared_feature_width_is_checked_against_the_model_it_names():
    config = dataclasses.replace(image_config("tf_efficientnet_lite0"), num_features=1000)
    with pytest.raises(ValueError, match="1280 wide, its config says 1000"):
        ImageEncoder(config, device="cpu")


def test_a_model_directorys_width_is_read_whatever_its_config_calls_it(tmp_path):
    from transformers import BertConfig, DistilBertConfig

    from encoders.text import TextConfig

    BertConfig(hidden_size=40, num_attention_heads=4, intermediate_size=80).save_pretrained(tmp_path / "bert")
    DistilBertConfig(dim=48, n_heads=4, hidden_dim=96).save_pretrained(tmp_path / "distilbert")  # "dim", no "hidden_size"
    assert TextConfig(name="bert", path=str(tmp_path / "bert")).dim == 40
    assert TextConfig(name="distilbert", path=str(tmp_path / "distilbert")).dim == 48


def test_the_encode_flows_driver_resolves_its_encoders_without_loading_torch():
    """The driver only coordinates: the schema's widths and the versions come from the configs, and the models
    (torch, timm, transformers: seconds and hundreds of MB per process) load in the actors only."""
    code = ("import sys; sys.path.insert(0, 'flows'); import encode_items; from encoders import image_config, "
            "text_config; from featurestore.images import ImageLoader; "
            "i, t = image_config('tf_efficientnet_lite0'), text_config('all-MiniLM-L6-v2'); "
            "print(i.dim, t.dim, i.version, t.version); "
            "print(sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, check=True)
    widths, loaded = done.stdout.splitlines()
    assert widths.startswith("1280 384 ") and loaded == "[]"


def test_unknown_models_fail_clearly():
    with pytest.raises(UnknownEncoderError, match="no-such-model"):
        image_config("no-such-model")
    with pytest.raises(UnknownEncoderError, match="no-such-model"):
        text_config("/nonexistent/no-such-model")
    with pytest.raises(ValueError, match="modality"):
        create_encoder("all-MiniLM-L6-v2", "audio")
