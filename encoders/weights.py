"""Which weights made an embedding: a fingerprint of the weight files, shared by the text and image configs."""
from __future__ import annotations

import hashlib
from pathlib import Path

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
