"""Fetching and decoding item images in CPU tasks: local paths, file:// and http(s):// URLs, or inline bytes."""
from __future__ import annotations

import io
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, ImageFile

# A truncated file must fail loudly, not decode as a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageFetchError(Exception):
    pass


def fetch_bytes(ref: str, timeout_s: float = 10.0, retries: int = 2, backoff_s: float = 0.5, session=None) -> bytes:
    """The raw bytes behind an image reference. HTTP gets a timeout and `retries` retries on transient failures."""
    parsed = urlparse(ref)
    if parsed.scheme in ("http", "https"):
        import requests

        getter = session or requests
        for attempt in range(retries + 1):
            try:
                response = getter.get(ref, timeout=timeout_s)
            except requests.RequestException as e:
                error = f"unreachable: {type(e).__name__}"
            else:
                if response.status_code == 200:
                    return response.content
                error = f"HTTP {response.status_code}"
                if response.status_code < 500 and response.status_code != 429:
                    break  # a 404 will not heal by retrying
            if attempt < retries:
                time.sleep(backoff_s * 2**attempt)
        raise ImageFetchError(f"{error} after {attempt + 1} attempt(s)")
    path = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(ref)
    if parsed.scheme not in ("", "file"):
        raise ImageFetchError(f"unsupported URL scheme {parsed.scheme!r}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageFetchError(f"cannot read {path}: {e.strerror or e}") from e


def decode(data: bytes) -> Image.Image:
    """Bytes -> a fully decoded PIL image; corrupt or truncated data raises ImageFetchError."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise ImageFetchError(f"cannot decode image: {e}") from e
    return image


class ImageLoader:
    """Ray Data batch function: adds `pixels` (n, S, S, 3) uint8, `has_image` and `image_error` columns.

    Runs as CPU tasks, so decoding and resizing happen on the workers, never on the driver.
    """

    def __init__(self, image_config, timeout_s: float = 10.0, retries: int = 2):
        self.image_config = image_config
        self.timeout_s = timeout_s
        self.retries = retries

    def load(self, ref: str | None, data: bytes | None) -> np.ndarray:
        from encoders.image import preprocess

        raw = data if data is not None else fetch_bytes(ref, self.timeout_s, self.retries)
        try:
            return preprocess(decode(raw), self.image_config)
        except ImageFetchError:
            raise
        except Exception as e:  # noqa: BLE001 - odd modes or sizes PIL cannot convert
            raise ImageFetchError(f"cannot convert image: {e}") from e

    def __call__(self, batch: dict) -> dict:
        size = self.image_config.input_size
        n = len(batch["item_id"])
        pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
        has_image = np.zeros(n, dtype=bool)
        errors = np.full(n, "", dtype=object)
        for i, (ref, data) in enumerate(zip(batch["image_ref"], batch["image_bytes"])):
            if ref is None and data is None:
                continue
            try:
                pixels[i] = self.load(ref, data)
                has_image[i] = True
            except ImageFetchError as e:
                errors[i] = str(e)
        for column in ("image_ref", "image_bytes"):  # consumed here; the driver keeps its own copy
            del batch[column]
        batch.update(pixels=pixels, has_image=has_image, image_error=errors)
        return batch
