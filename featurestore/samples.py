"""A small sample catalog of real photos (scikit-image's bundled images) for the demo and the tests."""
from __future__ import annotations

import json
from pathlib import Path

# (skimage.data name, item title, categories, description). Grayscale and RGBA images are kept as they are:
# the pipeline must convert them, not the catalog.
SAMPLE_PHOTOS = [
    ("astronaut", "Astronaut portrait", ["people", "space"], "Eileen Collins in a NASA portrait"),
    ("chelsea", "Chelsea the cat", ["animals", "cats"], "A tabby cat looking to the side"),
    ("coffee", "Cup of coffee", ["food", "drinks"], "An espresso cup on a saucer"),
    ("rocket", "Rocket on the launch pad", ["space", "vehicles"], "A rocket before launch"),
    ("hubble_deep_field", "Hubble deep field", ["space", "astronomy"], "Distant galaxies seen by Hubble"),
    ("immunohistochemistry", "Stained tissue", ["science", "microscopy"], "Immunohistochemistry of a tissue sample"),
    ("retina", "Human retina", ["science", "medicine"], "A photograph of the back of an eye"),
    ("colorwheel", "Colour wheel", ["graphics"], "A hue and saturation wheel"),
    ("logo", "scikit-image logo", ["graphics"], "A logo with a transparent background"),
    ("camera", "Cameraman", ["people", "black and white"], "A man with a film camera on a tripod"),
    ("coins", "Old coins", ["objects", "black and white"], "Greek coins from Pompeii"),
    ("moon", "Surface of the moon", ["space", "black and white"], "Craters on the lunar surface"),
    ("page", "Printed page", ["text", "black and white"], "A scanned page of printed text"),
    ("clock", "Wall clock", ["objects", "black and white"], "A clock photographed at an angle"),
    ("brick", "Brick wall", ["textures"], "A wall of bricks"),
    ("grass", "Grass", ["textures", "nature"], "A close-up of grass"),
    ("gravel", "Gravel", ["textures", "nature"], "A close-up of gravel"),
    ("cat", "Another cat photo", ["animals", "cats"], "The same tabby cat, a second item"),
]


def write_sample_catalog(directory: str | Path) -> Path:
    """Write the photos (JPEG, PNG where there is transparency) and `catalog.jsonl` with relative image paths."""
    import skimage.data
    from PIL import Image

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for name, title, categories, description in SAMPLE_PHOTOS:
        pixels = getattr(skimage.data, name)()
        image = Image.fromarray(pixels)
        file = f"images/{name}.{'png' if image.mode == 'RGBA' else 'jpg'}"
        if not (directory / file).exists():
            image.save(directory / file)
        record = {"item_id": f"photo-{name}", "title": title, "categories": categories,
                  "description": description, "image": file}
        lines.append(json.dumps(record))
    catalog = directory / "catalog.jsonl"
    catalog.write_text("\n".join(lines) + "\n")
    return catalog
