import base64
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurestore.catalogs import CatalogError, read_catalog
from featurestore.encode import TextTemplate, content_hash


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_generic_jsonl_rows_and_rejects(tmp_path):
    catalog = write_jsonl(tmp_path / "items.jsonl", [
        {"item_id": 7, "title": "Seven", "categories": "a|b| c", "image": "img/7.jpg"},
        {"item_id": "x", "title": "X", "categories": ["q"], "image": "file:///abs/x.png"},
        {"title": "no id"},
        {"item_id": "x", "title": "repeat"},
        {"item_id": "empty"},
        "{not json",
        {"item_id": "b64", "image_bytes": base64.b64encode(b"\x89PNG").decode()},
    ])
    parsed = read_catalog(str(catalog))
    rows = parsed.rows.to_pylist()
    assert [r["item_id"] for r in rows] == ["7", "x", "b64"]
    assert rows[0]["categories"] == ["a", "b", "c"]
    assert rows[0]["image_ref"] == str(tmp_path / "img" / "7.jpg")  # relative to the catalog's folder
    assert rows[1]["image_ref"] == "file:///abs/x.png"
    assert rows[2]["image_bytes"] == b"\x89PNG"
    reasons = {r["row"]: r["reason"] for r in parsed.rejects}
    assert reasons[2] == "missing item_id"
    assert "repeats row 1" in reasons[3]
    assert reasons[4] == "no text and no image"
    assert "not valid JSON" in reasons[5]
    assert parsed.input_rows == 7 == len(rows) + len(parsed.rejects)


def test_csv_and_parquet_keep_ids_as_text(tmp_path):
    (tmp_path / "items.csv").write_text("item_id,title,categories\n001,Zero one,x|y\n2,Two,\n")
    rows = read_catalog(str(tmp_path / "items.csv")).rows.to_pylist()
    assert [r["item_id"] for r in rows] == ["001", "2"] and rows[0]["categories"] == ["x", "y"]
    pq.write_table(pa.table({"item_id": [1, 2], "title": ["a", "b"], "image_bytes": [b"12", None]}), tmp_path / "i.parquet")
    rows = read_catalog(str(tmp_path / "i.parquet")).rows.to_pylist()
    assert [r["item_id"] for r in rows] == ["1", "2"] and rows[0]["image_bytes"] == b"12"


def test_amazon2023_metadata(tmp_path):
    catalog = write_jsonl(tmp_path / "meta.jsonl", [{
        "parent_asin": "B01", "title": "Game", "features": ["Fast", "Fun"], "description": ["A game."],
        "categories": ["Video Games", "PC"],
        "images": [{"large": "http://h/1.jpg", "variant": "PT01"}, {"large": "http://h/main.jpg", "variant": "MAIN"}],
    }, {"parent_asin": "B02", "title": "No images", "images": []}])
    rows = read_catalog(str(catalog), "amazon2023").rows.to_pylist()
    assert rows[0]["item_id"] == "B01" and rows[0]["image_ref"] == "http://h/main.jpg"
    assert rows[0]["description"] == "Fast Fun A game." and rows[0]["categories"] == ["Video Games", "PC"]
    assert rows[1]["image_ref"] is None


def test_movielens_catalog():
    parsed = read_catalog("ml-100k")
    assert parsed.rows.num_rows == 1682 and not parsed.rejects
    toy_story = parsed.rows.to_pylist()[0]
    assert toy_story["item_id"] == "1" and "Toy Story" in toy_story["title"]
    assert "Animation" in toy_story["categories"]


def test_bad_catalog_arguments_fail_at_once(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        read_catalog(str(tmp_path / "missing.jsonl"))
    with pytest.raises(CatalogError, match="format"):
        read_catalog(str(tmp_path / "items.txt"))
    (tmp_path / "x.csv").write_text("id,title\n1,a\n")
    with pytest.raises(CatalogError, match="no item_id column"):
        read_catalog(str(tmp_path / "x.csv"))


def test_text_template_leaves_out_empty_parts():
    row = {"item_id": "1", "title": "Heat", "description": "", "categories": ["Crime", "Thriller"]}
    assert TextTemplate().render(row) == "Heat. Categories: Crime, Thriller"
    assert TextTemplate("{title} ({item_id})").render(row) == "Heat (1)"
    with pytest.raises(ValueError, match="brand"):
        TextTemplate("{brand}").render(row)


def test_content_hash_tracks_text_image_and_encoders():
    base = content_hash("t", "a.jpg", None, "txt@1", "img@1")
    assert base == content_hash("t", "a.jpg", None, "txt@1", "img@1")
    assert len({base, content_hash("t2", "a.jpg", None, "txt@1", "img@1"), content_hash("t", "b.jpg", None, "txt@1", "img@1"),
                content_hash("t", "a.jpg", None, "txt@2", "img@1"), content_hash("t", None, b"123", "txt@1", "img@1")}) == 5
