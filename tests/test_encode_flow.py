"""The encoding flow end to end: real Ray, real LanceDB, real weights, real photos."""
import functools
import http.server
import json
import shutil
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from encoders.registry import UnknownEncoderError
from featurestore import store
from featurestore.catalogs import CatalogError
from featurestore.encode import encode_catalog, plan_resources
from featurestore.images import ImagePolicy
from featurestore.query import get_embeddings, similar_items
from featurestore.raycluster import ResourcePlanError

pytestmark = pytest.mark.e2e


def add_bad_rows(directory, catalog):
    """The sample photos plus every kind of bad input the flow must survive."""
    images = directory / "images"
    (images / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (images / "truncated.jpg").write_bytes((images / "chelsea.jpg").read_bytes()[:3000])
    Image.open(images / "coffee.jpg").convert("CMYK").save(images / "cmyk.jpg")
    rows = [json.loads(line) for line in catalog.read_text().splitlines()]
    rows += [
        {"item_id": "corrupt", "title": "Corrupt picture", "image": "images/corrupt.jpg"},
        {"item_id": "truncated", "title": "Truncated picture", "image": "images/truncated.jpg"},
        {"item_id": "missing", "title": "Missing picture", "image": "images/missing.jpg"},
        {"item_id": "nothing-usable", "image": "images/also-missing.jpg"},
        {"item_id": "cmyk", "title": "CMYK coffee", "image": "images/cmyk.jpg"},
        {"title": "row without an id"},
        {"item_id": "photo-coffee", "title": "a repeated id"},
    ]
    path = directory / "catalog_with_bad_rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, len(rows)


@pytest.fixture(scope="module")
def encoded(ray_local, sample_catalog, tmp_path_factory):
    catalog, n_rows = add_bad_rows(sample_catalog.parent, sample_catalog)
    db_uri = str(tmp_path_factory.mktemp("store") / "db")
    summary = encode_catalog(str(catalog), db_uri=db_uri, batch_size=8)
    return {"catalog": catalog, "rows": n_rows, "db_uri": db_uri, "summary": summary}


def test_counts_add_up_and_bad_images_do_not_lose_items(encoded):
    s = encoded["summary"]
    assert s.input == encoded["rows"] == s.encoded + s.unchanged + s.rejected_whole
    assert (s.encoded, s.unchanged, s.rejected_whole, s.image_failures) == (encoded["rows"] - 3, 0, 3, 3)
    db = store.connect(encoded["db_uri"])
    items = db.open_table("items").to_pandas().set_index("item_id")
    no_image = set(items.index[items["image_emb"].isna()])
    assert no_image == {"corrupt", "truncated", "missing"}  # still encoded, from their text
    assert items["text_emb"].notna().all()
    rejects = db.open_table("item_rejects").to_pandas()
    by_item = {(r.item_id if isinstance(r.item_id, str) else f"row {r.row}"): (r.stage, r.reason) for r in rejects.itertuples()}
    assert by_item["corrupt"][0] == by_item["truncated"][0] == by_item["missing"][0] == "image"
    assert "truncated" in by_item["truncated"][1] and "No such file" in by_item["missing"][1]
    assert by_item["nothing-usable"][0] == "encode"
    # the first row of an id wins; the repeat names it by file and line (rows are 1-based lines here)
    assert by_item["photo-coffee"] == ("read", f"item_id 'photo-coffee' repeats line 3 of {encoded['catalog']}")
    assert by_item[f"row {encoded['rows'] - 1}"] == ("read", "missing item_id")
    assert len(rejects) == 6


def test_table_schema_and_embeddings(encoded):
    table = store.connect(encoded["db_uri"]).open_table("items")
    schema = table.schema
    assert str(schema.field("text_emb").type) == "fixed_size_list<item: float>[384]"
    assert str(schema.field("image_emb").type) == "fixed_size_list<item: float>[1280]"
    row = get_embeddings(store.connect(encoded["db_uri"]), ["photo-chelsea"]).iloc[0]
    assert np.linalg.norm(row["text_emb"]) == pytest.approx(1.0, abs=1e-5)
    assert np.linalg.norm(row["image_emb"]) == pytest.approx(1.0, abs=1e-5)
    versions = table.to_pandas()[["text_encoder", "text_encoder_version", "image_encoder_version"]].drop_duplicates()
    assert len(versions) == 1 and versions.iloc[0]["text_encoder"] == "all-MiniLM-L6-v2"


def test_neighbours_make_sense(encoded):
    db = store.connect(encoded["db_uri"])
    by_image = similar_items(db, item_id="photo-chelsea", by="image", k=3)
    assert by_image["item_id"].iloc[0] == "photo-cat"  # the other photo of the same cat
    assert "photo-chelsea" not in set(by_image["item_id"])
    cmyk = similar_items(db, item_id="cmyk", by="image", k=1)
    assert cmyk["item_id"].iloc[0] == "photo-coffee"  # the CMYK copy was converted, not garbled
    by_text = similar_items(db, text="outer space", k=4)
    assert {"photo-rocket", "photo-astronaut", "photo-hubble_deep_field", "photo-moon"} & set(by_text["item_id"][:2])
    both = similar_items(db, item_id="photo-chelsea", by="both", k=3)
    assert both["item_id"].iloc[0] == "photo-cat"
    assert np.all(np.diff(both["similarity"]) <= 1e-9)
    with pytest.raises(KeyError, match="nope"):
        get_embeddings(db, ["photo-cat", "nope"])


def test_rerun_encodes_nothing_then_only_changes(encoded, tmp_path):
    db = store.connect(encoded["db_uri"])
    rejects_before = db.open_table("item_rejects").count_rows()
    again = encode_catalog(str(encoded["catalog"]), db_uri=encoded["db_uri"], batch_size=8)
    assert (again.encoded, again.unchanged, again.rejected_whole) == (0, encoded["summary"].encoded, 3)
    assert again.input == again.encoded + again.unchanged + again.rejected_whole
    assert db.open_table("item_rejects").count_rows() == rejects_before  # no duplicate reject records

    rows = [json.loads(line) for line in encoded["catalog"].read_text().splitlines()]
    rows[0]["title"] = "A new title"
    rows.append({"item_id": "new-item", "title": "Brand new"})
    changed = encoded["catalog"].parent / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = get_embeddings(db, [rows[0]["item_id"]]).iloc[0]
    third = encode_catalog(str(changed), db_uri=encoded["db_uri"], batch_size=8)
    assert (third.encoded, third.unchanged) == (2, encoded["summary"].encoded - 1)
    after = get_embeddings(db, [rows[0]["item_id"], "new-item"])
    assert not np.allclose(before["text_emb"], after.iloc[0]["text_emb"])
    np.testing.assert_allclose(before["image_emb"], after.iloc[0]["image_emb"], atol=1e-6)
    assert db.open_table("items").count_rows() == encoded["summary"].encoded + 1


def test_text_only_catalog(ray_local, tmp_path):
    summary = encode_catalog("ml-100k", db_uri=str(tmp_path / "db"), limit=150)
    assert (summary.input, summary.encoded, summary.rejected_whole, summary.image_failures) == (150, 150, 0, 0)
    items = store.connect(str(tmp_path / "db")).open_table("items")
    assert items.count_rows("image_emb IS NULL") == 150 and items.count_rows("text_emb IS NOT NULL") == 150
    toy_story = get_embeddings(store.connect(str(tmp_path / "db")), ["1"]).iloc[0]
    assert toy_story["text"] == "Toy Story (1995). Categories: Animation, Children's, Comedy"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def image_server(sample_catalog):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(sample_catalog.parent / "images"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_amazon2023_catalog_over_http(ray_local, encoded, image_server, tmp_path):
    closed_port = free_port()
    records = [
        {"parent_asin": "B0CAT", "title": "Cat poster", "categories": ["Home"], "features": ["Glossy"],
         "images": [{"large": f"{image_server}/chelsea.jpg", "variant": "MAIN"}]},
        {"parent_asin": "B0ROCKET", "title": "Rocket model", "images": [{"large": f"{image_server}/rocket.jpg"}]},
        {"parent_asin": "B0GONE", "title": "Gone image", "images": [{"large": f"{image_server}/nope.jpg"}]},
        {"parent_asin": "B0DOWN", "title": "Server down", "images": [{"large": f"http://127.0.0.1:{closed_port}/x.jpg"}]},
    ]
    catalog = tmp_path / "meta_Video_Games.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in records))
    db_uri = str(tmp_path / "db")
    summary = encode_catalog(str(catalog), fmt="amazon2023", db_uri=db_uri, batch_size=4,
                             images=ImagePolicy(allow_private_hosts=True))  # the servers are on loopback
    assert (summary.input, summary.encoded, summary.image_failures, summary.rejected_whole) == (4, 4, 2, 0)
    db = store.connect(db_uri)
    reasons = db.open_table("item_rejects").to_pandas().set_index("item_id")["reason"]
    assert reasons["B0GONE"].startswith("HTTP 404") and "unreachable" in reasons["B0DOWN"]
    # the same photo fetched over HTTP and read from disk gives the same embedding
    remote = get_embeddings(db, ["B0CAT"]).iloc[0]["image_emb"]
    local = get_embeddings(store.connect(encoded["db_uri"]), ["photo-chelsea"]).iloc[0]["image_emb"]
    np.testing.assert_allclose(remote, local, atol=1e-5)


def test_bad_arguments_fail_at_once(ray_local, sample_catalog, tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        encode_catalog(str(tmp_path / "nope.jsonl"), db_uri=str(tmp_path / "db"))
    with pytest.raises(UnknownEncoderError, match="not-a-model"):
        encode_catalog(str(sample_catalog), db_uri=str(tmp_path / "db"), image_model="not-a-model")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(store.StoreError, match="afile"):
        encode_catalog(str(sample_catalog), db_uri=str(tmp_path / "afile"))


def test_an_encoder_actor_loads_its_model_in_the_background_and_its_first_batch_gets_the_model_or_its_error(
        ray_local, tmp_path):
    import pyarrow as pa
    import torch

    from encoders import create_encoder
    from featurestore.encode import ENCODE, TextEmbedder

    batch = pa.table({"text": ["a red bicycle", ""], "verdict": [ENCODE, ENCODE]})
    threads = torch.get_num_threads()  # this process's count, kept
    embedded = TextEmbedder("all-MiniLM-L6-v2", threads, 384)(batch)["text_emb"]
    expected = create_encoder("all-MiniLM-L6-v2", "text", device="cpu").encode(["a red bicycle"])[0]
    np.testing.assert_allclose(embedded[0].values.to_numpy(), expected, atol=1e-5)
    assert not embedded[1].is_valid  # no text, no vector
    not_a_model = str(tmp_path)  # a folder without a model: fails at once (a name would be looked up online)
    with pytest.raises(UnknownEncoderError, match="not loadable"):  # the load's error, at the first batch
        TextEmbedder(not_a_model, threads, 384)(batch)


def test_resource_plan_never_starves_the_feeding_tasks():
    plan = plan_resources(cluster_cpus=2, cluster_gpus=0, stages=2, actors=None, gpus_per_actor=None)
    assert plan.actors == 1 and plan.gpus == 0 and 2 * plan.cpus <= 2 - 1.0  # a join's shuffle task needs 1 CPU
    assert plan.torch_threads == 2  # each stage's actor may use both cores when the other stage waits
    gpu = plan_resources(cluster_cpus=16, cluster_gpus=4, stages=2, actors=None, gpus_per_actor=None)
    assert gpu.gpus == 1.0 and gpu.actors == 2
    with pytest.raises(ResourcePlanError, match="GPUs"):
        plan_resources(cluster_cpus=16, cluster_gpus=1, stages=2, actors=2, gpus_per_actor=1)
    with pytest.raises(ResourcePlanError, match="fewer --actors"):
        plan_resources(cluster_cpus=2, cluster_gpus=0, stages=2, actors=8, gpus_per_actor=0)
    with pytest.raises(ResourcePlanError, match="more than the 1 it keeps for Ray Data"):
        plan_resources(cluster_cpus=1, cluster_gpus=0, stages=1, actors=None, gpus_per_actor=None)



def test_the_steady_rate_is_measured_only_over_a_window_of_at_least_half_the_stream():
    """Results that reach the driver in one burst at the end measure the burst: no steady rate then."""
    from featurestore.encode import EncodeSummary, steady_rate

    # (first results with encoded items: when, how many), all encoded, the stream's end, the stream's seconds
    assert steady_rate((10.0, 100), 1100, 30.0, 30.0) == 50.0  # 1,000 items over the last 20 of 30 s
    assert steady_rate((29.9, 100), 1682, 30.0, 30.0) is None  # the rest arrived with the first: a burst
    assert steady_rate((10.0, 100), 100, 30.0, 30.0) is None and steady_rate(None, 0, 30.0, 30.0) is None
    lines = EncodeSummary("items", encoded=5, encode_seconds=1.0).lines()
    assert "5.0 items/s overall, steady state not measured: the results came in a burst" in lines[1]
