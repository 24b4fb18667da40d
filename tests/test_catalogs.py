import base64
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurestore.catalogs import CatalogError, open_catalog, read_catalog
from featurestore.encode import TextTemplate, content_hash


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def usable(table):
    return [r for r in table.to_pylist() if r["reject"] is None]


def test_generic_jsonl_rows_and_rejects(tmp_path):
    catalog = write_jsonl(tmp_path / "items.jsonl", [
        {"item_id": 7, "title": "Seven", "categories": "a|b| c", "image": "img/7.jpg"},
        {"item_id": "x", "title": "X", "categories": ["q"], "image": "file:///abs/x.png"},
        {"title": "no id"},
        "",
        {"item_id": "empty"},
        "{not json",
        {"item_id": "b64", "image_bytes": base64.b64encode(b"\x89PNG").decode()},
        {"item_id": "bad64", "image_bytes": "***"},
        "[1, 2]",
    ])
    parsed = read_catalog(str(catalog))
    rows = usable(parsed)
    assert [r["item_id"] for r in rows] == ["7", "x", "b64"]
    assert rows[0]["categories"] == ["a", "b", "c"]
    assert rows[0]["image_ref"] == str(tmp_path / "img" / "7.jpg")  # relative to the catalog's folder
    assert rows[1]["image_ref"] == "file:///abs/x.png"
    assert rows[2]["image_bytes"] == b"\x89PNG"
    reasons = {r["row"]: r["reject"] for r in parsed.to_pylist() if r["reject"]}  # rows are 1-based lines
    assert reasons[3] == "missing item_id"
    assert reasons[5] == "no text and no image"
    assert reasons[6].startswith("line 6 is not valid JSON")
    assert reasons[8].startswith("image_bytes is not valid base64")
    assert reasons[9] == "line 9 is not a JSON object"
    assert parsed.num_rows == 8 and set(parsed.column("source").to_pylist()) == {str(catalog)}  # the blank line is no row


def test_bad_bytes_and_broken_csv_rows_are_rejects_with_their_lines(tmp_path):
    (tmp_path / "items.jsonl").write_bytes(b'{"item_id": "a", "title": "A"}\n{"item_id": "b", "title": "\xff"}\n'
                                           b'{"item_id": "c", "title": "C"}\n')
    parsed = read_catalog(str(tmp_path / "items.jsonl")).to_pylist()
    assert [r["item_id"] for r in parsed if not r["reject"]] == ["a", "c"]
    assert parsed[1]["row"] == 2 and parsed[1]["reject"].startswith("line 2 is not valid UTF-8")
    (tmp_path / "items.csv").write_bytes(b'item_id,title\n1,"two\nlines"\n2,x,extra\n3,\xfe\n4,ok\n')
    parsed = read_catalog(str(tmp_path / "items.csv")).to_pylist()
    assert [(r["row"], r["item_id"], r["title"]) for r in parsed if not r["reject"]] == [(2, "1", "two\nlines"), (6, "4", "ok")]
    assert [(r["row"], r["reject"]) for r in parsed if r["reject"]] == [
        (4, "line 4 has 3 fields; the header has 2"), (5, "line 5 is not valid UTF-8")]


def test_folders_and_globs_read_every_file_in_order(tmp_path):
    for i in range(3):
        pq.write_table(pa.table({"item_id": [f"{i}a", f"{i}b"], "title": ["x", "y"]}), tmp_path / f"part-{i}.parquet")
    (tmp_path / "_SUCCESS").write_text("")  # markers and hidden files are not catalog files
    (tmp_path / ".hidden.parquet").write_text("")
    source = open_catalog(str(tmp_path))
    assert source.fmt == "parquet" and [f.rsplit("/", 1)[1] for f in source.files] == [f"part-{i}.parquet" for i in range(3)]
    rows = source.read_local().to_pylist()
    assert [r["item_id"] for r in rows] == ["0a", "0b", "1a", "1b", "2a", "2b"]
    assert source.where(rows[3]["rank"]) == f"row 1 of {tmp_path / 'part-1.parquet'}"
    assert open_catalog(str(tmp_path / "part-[12].parquet")).files == source.files[1:]
    assert [r["item_id"] for r in read_catalog(str(tmp_path), limit=3).to_pylist()] == ["0a", "0b", "1a"]


def test_csv_and_parquet_keep_ids_as_text(tmp_path):
    (tmp_path / "items.csv").write_text("item_id,title,categories\n001,Zero one,x|y\n2,Two,\n")
    rows = usable(read_catalog(str(tmp_path / "items.csv")))
    assert [r["item_id"] for r in rows] == ["001", "2"] and rows[0]["categories"] == ["x", "y"]
    pq.write_table(pa.table({"item_id": [1, 2], "title": ["a", "b"], "image_bytes": [b"12", None]}), tmp_path / "i.parquet")
    rows = usable(read_catalog(str(tmp_path / "i.parquet")))
    assert [r["item_id"] for r in rows] == ["1", "2"] and rows[0]["image_bytes"] == b"12"
    # the header decides whether the flow plans an image stage; JSONL lines may each carry one
    assert open_catalog(str(tmp_path / "i.parquet")).has_images
    assert not open_catalog(str(tmp_path / "items.csv")).has_images and not open_catalog("ml-100k").has_images
    (tmp_path / "j.jsonl").write_text('{"item_id": "a", "title": "A"}\n')
    assert open_catalog(str(tmp_path / "j.jsonl")).has_images


def test_amazon2023_metadata(tmp_path):
    catalog = write_jsonl(tmp_path / "meta.jsonl", [{
        "parent_asin": "B01", "title": "Game", "features": ["Fast", "Fun"], "description": ["A game."],
        "categories": ["Video Games", "PC"],
        "images": [{"large": "http://h/1.jpg", "variant": "PT01"}, {"large": "http://h/main.jpg", "variant": "MAIN"}],
    }, {"parent_asin": "B02", "title": "No images", "images": []}])
    rows = usable(read_catalog(str(catalog), "amazon2023"))
    assert rows[0]["item_id"] == "B01" and rows[0]["image_ref"] == "http://h/main.jpg"
    assert rows[0]["description"] == "Fast Fun A game." and rows[0]["categories"] == ["Video Games", "PC"]
    assert rows[1]["image_ref"] is None


def test_movielens_catalog():
    parsed = read_catalog("ml-100k")
    assert parsed.num_rows == 1682 and parsed.column("reject").null_count == 1682
    toy_story = parsed.to_pylist()[0]
    assert toy_story["item_id"] == "1" and "Toy Story" in toy_story["title"]
    assert "Animation" in toy_story["categories"]


def test_bad_catalog_arguments_fail_at_once(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        read_catalog(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="holds no files"):
        open_catalog(str(tmp_path / "empty"))
    (tmp_path / "items.txt").write_text("x\n")
    with pytest.raises(CatalogError, match="cannot tell the format"):
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
