"""Encoding-flow throughput vs a bare in-process loop over the same encoder, batches and torch thread count.

    .venv/bin/python bench/encode_throughput.py                       # defaults: 5000 text, 300 images
    .venv/bin/python bench/encode_throughput.py --text-items 1000 --image-items 0

What is measured, per modality (text-only catalog; image catalog whose items also carry text):

* bare loop: `create_encoder(...).encode(batch)` in this process, on the batches the flow's actor sees (the source
  blocks `EncodeJob.dataset` makes, cut into --batch-size batches), with `torch.set_num_threads` set to the count
  `plan_resources` gives the flow's actors. Steady state = every batch after the first.
* flow: `EncodeJob(db, table, settings).run(catalog)` into a fresh temporary LanceDB; steady state and start-up are
  the flow's own `EncodeSummary.steady_items_per_s` / `first_batch_seconds`.
* ratio = bare steady items/s / flow steady items/s (the flow's overhead; the target for text is <= 1.15).
* start-up, reported separately: `ray.init` (by `ensure_ray`, as in the flow), and a bare Ray actor that imports the
  encoder and loads the model (the same work an encoder actor does before its first batch).
* where the flow's wall time goes: driver-side planning (render/hash/diff), time to the first batch, the streamed
  part, driver-side row conversion, LanceDB create/merge_insert, reject records and index upkeep. The driver-side
  parts are timed by wrapping `EncodeJob.plan`/`item_rows`, `store.upsert`, `store.record_rejects` and
  `ensure_indexes` in this process (timing only; the flow's code is unchanged).

The machine is shared: the load average before each measurement is recorded; numbers taken while other work ran
are not comparable (the script says so).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurestore.raycluster import ensure_ray  # noqa: E402 - after the path insert; before anything imports ray

TEXT_MODEL = "all-MiniLM-L6-v2"
IMAGE_MODEL = "tf_efficientnet_lite0"

# --------------------------------------------------------------------------------------------------------------
# catalogs


EDITIONS = ["", " (Director's Cut)", " (Remastered)", " (Extended Edition)", " (Anniversary Edition)", " (Special Edition)"]
ADJECTIVES = ["gripping", "quiet", "sprawling", "witty", "bleak", "tender", "stylish", "uneven", "sharp", "warm",
              "haunting", "brash", "slow-burning", "playful", "ambitious", "understated"]
NOUNS = ["film", "picture", "feature", "story", "tale", "drama", "movie"]
PLOTS = [
    "a family that comes apart over one long summer", "two rivals forced to work together",
    "a small town hiding an old secret", "a heist that goes wrong from the first minute",
    "a young woman who leaves home for the city", "an unlikely friendship across a border",
    "a detective who cannot let a case go", "a journey through a country at war",
    "a musician trying to make it one last time", "a crew stranded far from home",
    "a teacher and the class that changes her", "a con artist who meets his match",
    "a soldier returning to a world that moved on", "a scientist racing against a deadline",
]
EXTRAS = ["", " Shot on location with a largely unknown cast.", " Based on a best-selling novel.",
          " Restored from the original negative.", " Includes an alternate ending.",
          " Nominated for several awards on release."]


def text_records(n: int, seed: int = 0) -> list[dict]:
    """n catalog records from the MovieLens-1M movies (titles, years, genres), repeated as re-releases, each with a
    generated one- or two-sentence description, so every item has a different text of realistic length."""
    from featurestore.movielens import load_items

    movies = load_items("ml-1m").to_dict("records")
    rng = random.Random(seed)
    records = []
    for i in range(n):
        movie, edition = movies[i % len(movies)], i // len(movies)
        year = movie["year"] if movie["year"] == movie["year"] and movie["year"] is not None else None
        genres = movie["genres"] or ["Drama"]
        title = movie["title"] + EDITIONS[edition % len(EDITIONS)] + (f" ({year})" if year else "")
        description = (
            f"A {rng.choice(ADJECTIVES)} {genres[0].lower()} {rng.choice(NOUNS)}"
            f"{' from ' + str(year) if year else ''} about {rng.choice(PLOTS)}.{rng.choice(EXTRAS)}"
        )
        records.append({"item_id": f"m{i:06d}", "title": title, "description": description, "categories": genres})
    return records


PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "cat", "camera", "coins", "clock", "moon", "brick", "grass",
          "gravel", "hubble_deep_field", "immunohistochemistry", "retina", "page", "text", "colorwheel"]


def image_records(n: int, folder: Path, seed: int = 0) -> list[dict]:
    """n JPEG files made from the real photos in `skimage.data`: random crops (50-100% of each side) and mirror
    flips, so every file (and content hash) differs; records reference them by relative path."""
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = {name: np.asarray(getattr(skimage.data, name)()) for name in PHOTOS}
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        pixels = sources[name]
        h, w = pixels.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = pixels[top:top + ch, left:left + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(np.ascontiguousarray(crop)).convert("RGB").save(path, quality=90)
        records.append({
            "item_id": f"p{i:06d}", "title": f"{name.replace('_', ' ').title()} #{i}",
            "description": f"Crop {cw}x{ch} of the {name.replace('_', ' ')} photo.",
            "categories": ["photo", name], "image": f"{folder.name}/{path.name}",
        })
    return records


def write_jsonl(records: list[dict], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


# --------------------------------------------------------------------------------------------------------------
# CPU accounting: the machine is shared, so every measurement says how much CPU other people's processes took


HZ = os.sysconf("SC_CLK_TCK")


def cpu_snapshot() -> tuple[float, dict[int, int], int, int]:
    """(time, {pid: CPU ticks} for this process tree (driver, Ray's daemons and workers), machine busy ticks, steal
    ticks). Live processes only (no cutime: Ray reaps some workers outside the tree), so a process that exits
    during a window loses its last ticks: a small undercount, never a negative one."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            procs[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    mine, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        if pid in procs:
            mine[pid] = procs[pid][1]
        todo += children.get(pid, [])
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return time.perf_counter(), mine, v[0] + v[1] + v[2] + v[5] + v[6], v[7]


def cpu_between(a, b, items: int | None = None) -> dict:
    wall = max(b[0] - a[0], 1e-9)
    mine = sum(ticks - a[1].get(pid, 0) for pid, ticks in b[1].items())
    busy, steal = b[2] - a[2], b[3] - a[3]
    out = {
        "wall_s": round(wall, 2),
        "this_benchmark_cores": round(mine / HZ / wall, 2),
        "other_processes_cores": round(max(0, busy - mine) / HZ / wall, 2),
        "steal_cores": round(steal / HZ / wall, 2),
    }
    if items:
        out["cpu_s_per_1000_items"] = round(mine / HZ / items * 1000, 2)
    return out


def wait_quiet(max_wait_s: float, threshold: float = 0.3, window_s: float = 3.0) -> dict:
    """Wait (at most max_wait_s) until other processes use less than `threshold` cores over a few seconds."""
    start = time.perf_counter()
    while True:
        a = cpu_snapshot()
        time.sleep(window_s)
        others = cpu_between(a, cpu_snapshot())["other_processes_cores"]
        waited = time.perf_counter() - start
        if others < threshold or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "other_processes_cores": others}


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------------------------------------------
# instrumentation: timing wrappers around the driver-side steps of the flow (its behaviour is unchanged)


class Probe:
    def __init__(self, expected_rows: int):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.datasets: list = []
        self.source_blocks: list[int] = []
        self.expected_rows, self.rows_seen = expected_rows, 0
        self.first_batch_cpu = self.last_batch_cpu = None

    def add(self, name: str, dt: float):
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, owner, attr: str, name: str):
        original = getattr(owner, attr)
        probe = self

        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                probe.add(name, time.perf_counter() - start)

        setattr(owner, attr, wrapped)
        return lambda: setattr(owner, attr, original)


def instrument(probe: Probe):
    import ray.data

    from featurestore import encode, store

    undo = [
        probe.wrap(encode.EncodeJob, "plan", "plan"),
        probe.wrap(encode.EncodeJob, "item_rows", "item_rows"),
        probe.wrap(store, "upsert", "upsert"),
        probe.wrap(store, "record_rejects", "record_rejects"),
        probe.wrap(encode, "ensure_indexes", "ensure_indexes"),
    ]
    timed_item_rows = encode.EncodeJob.item_rows

    def item_rows(self, batch, *args, **kwargs):
        # CPU snapshots when the first batch reaches the driver and after the last one: the steady-state window
        if probe.first_batch_cpu is None:
            probe.first_batch_cpu = cpu_snapshot()
        out = timed_item_rows(self, batch, *args, **kwargs)
        probe.rows_seen += len(batch["item_id"])
        if probe.rows_seen >= probe.expected_rows:
            probe.last_batch_cpu = cpu_snapshot()
        return out

    encode.EncodeJob.item_rows = item_rows
    undo.append(lambda: setattr(encode.EncodeJob, "item_rows", timed_item_rows))

    original_dataset = encode.EncodeJob.dataset

    def dataset(self, *args, **kwargs):
        start = time.perf_counter()
        out = original_dataset(self, *args, **kwargs)
        probe.add("dataset_build", time.perf_counter() - start)
        probe.datasets.append(out[0])
        return out

    encode.EncodeJob.dataset = dataset
    undo.append(lambda: setattr(encode.EncodeJob, "dataset", original_dataset))

    # the flow's source blocks, so that the bare loop gets the same batches whatever the block policy is
    original_from_arrow = ray.data.from_arrow

    def from_arrow(tables, *args, **kwargs):
        probe.source_blocks = [t.num_rows for t in (tables if isinstance(tables, list) else [tables])]
        return original_from_arrow(tables, *args, **kwargs)

    ray.data.from_arrow = from_arrow
    undo.append(lambda: setattr(ray.data, "from_arrow", original_from_arrow))
    return lambda: [u() for u in reversed(undo)]


# --------------------------------------------------------------------------------------------------------------
# measurements


def flow_batches(source_blocks: list[int], batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch the flow's encoder actor gets: the flow's source blocks, each cut into
    batch_size batches."""
    out, block_start = [], 0
    for rows in source_blocks:
        block_stop = block_start + rows
        out += [(s, min(block_stop, s + batch_size)) for s in range(block_start, block_stop, batch_size)]
        block_start = block_stop
    return out


def bare_loop(encoder, inputs, batches: list[tuple[int, int]], threads: int) -> dict:
    """Encode `inputs` batch by batch in this process with `threads` torch threads; steady state = batches 2..n."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        load = loadavg()
        times = []
        for start, stop in batches:
            t0 = time.perf_counter()
            encoder.encode(inputs[start:stop])
            times.append(time.perf_counter() - t0)
            if len(times) == 1:
                steady_start = cpu_snapshot()
        steady_end = cpu_snapshot()
    finally:
        torch.set_num_threads(before)
    n = batches[-1][1] - batches[0][0]
    steady_rows = n - (batches[0][1] - batches[0][0])
    return {
        "threads": threads,
        "batches": len(batches),
        "seconds": round(sum(times), 3),
        "first_batch_seconds": round(times[0], 3),
        "items_per_s": round(n / sum(times), 2),
        "steady_items_per_s": round(steady_rows / sum(times[1:]), 2) if len(times) > 1 else round(n / sum(times), 2),
        "steady_cpu": cpu_between(steady_start, steady_end, steady_rows) if len(times) > 1 else None,
        "loadavg_before": load,
    }


def actor_start(model: str, kind: str, threads: int, num_cpus: float) -> dict:
    """A bare Ray actor doing what an encoder actor does before its first batch (worker start, imports, weights)."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    class Loader:
        def __init__(self):
            t0 = time.perf_counter()
            import torch

            from encoders import create_encoder

            torch.set_num_threads(threads)
            t1 = time.perf_counter()
            self.encoder = create_encoder(model, kind)
            self.import_s, self.load_s = t1 - t0, time.perf_counter() - t1

        def timings(self):
            return self.import_s, self.load_s

    start = time.perf_counter()
    actor = Loader.remote()
    import_s, load_s = ray.get(actor.timings.remote())
    total = time.perf_counter() - start
    ray.kill(actor)
    return {"total_s": round(total, 2), "imports_s": round(import_s, 2), "model_load_s": round(load_s, 2),
            "worker_start_s": round(total - import_s - load_s, 2)}


def operator_timeline(ds, t0: float) -> dict:
    """Per Ray Data operator, from its per-block execution stats (start/end are perf_counter times, i.e.
    CLOCK_MONOTONIC, comparable across processes on one machine): tasks, rows, when its first task started and
    its last ended (seconds after t0), busy (sum of task wall time), CPU, and for the tasks after the first one the
    throughput over the span between the first and the last task end and the share of that span spent busy."""
    raw, stack, out = ds._raw_stats(), [], {}
    stack.append(raw)
    while stack:
        stats = stack.pop()
        stack += list(getattr(stats, "parents", []) or [])
        for name, blocks in (getattr(stats, "metadata", {}) or {}).items():
            tasks: dict[int, list] = {}
            for block in blocks:
                es = getattr(block, "exec_stats", None)
                if es is None or es.start_time_s is None or es.end_time_s is None:
                    continue
                t = tasks.setdefault(es.task_idx, [es.start_time_s, es.end_time_s, 0, 0.0, 0.0, 0.0])
                t[0], t[1] = min(t[0], es.start_time_s), max(t[1], es.end_time_s)
                t[2] += block.num_rows or 0
                t[3] += es.wall_time_s or 0.0
                t[4] += es.cpu_time_s or 0.0
                t[5] += getattr(es, "function_body_time_s", None) or 0.0
            if not tasks:
                continue
            ordered = sorted(tasks.values(), key=lambda t: t[1])
            rows = sum(t[2] for t in ordered)
            busy = sum(t[3] for t in ordered)
            op = {
                "tasks": len(ordered), "rows": rows,
                "first_task_start_s": round(ordered[0][0] - t0, 3), "last_task_end_s": round(ordered[-1][1] - t0, 3),
                "busy_s": round(busy, 3), "cpu_s": round(sum(t[4] for t in ordered), 3),
                "function_body_s": round(sum(t[5] for t in ordered), 3),
                "compute_items_per_s": round(rows / busy, 2) if busy else None,
                "span_items_per_s": round(rows / (ordered[-1][1] - ordered[0][0]), 2),
            }
            if len(ordered) > 1:
                span = ordered[-1][1] - ordered[0][1]
                later_rows = sum(t[2] for t in ordered[1:])
                op["steady_items_per_s"] = round(later_rows / span, 2) if span > 0 else None
                op["steady_busy_fraction"] = round(sum(t[3] for t in ordered[1:]) / span, 3) if span > 0 else None
                op["gaps_s"] = round(sum(max(0.0, b[0] - a[1]) for a, b in zip(ordered, ordered[1:])), 3)
            out[name] = op
    return out


def run_flow(catalog_path: Path, db_dir: Path, batch_size: int, table: str) -> dict:
    from featurestore import store
    from featurestore.catalogs import read_catalog
    from featurestore.encode import EncodeJob, EncodeSettings

    t0 = time.perf_counter()
    catalog = read_catalog(str(catalog_path))
    read_s = time.perf_counter() - t0
    probe = Probe(expected_rows=catalog.rows.num_rows)
    db = store.connect(str(db_dir))
    job = EncodeJob(db, table, EncodeSettings(text_model=TEXT_MODEL, image_model=IMAGE_MODEL, batch_size=batch_size))
    undo = instrument(probe)
    load = loadavg()
    try:
        start = cpu_snapshot()
        summary = job.run(catalog)
        end = cpu_snapshot()
    finally:
        undo()
    run_s = end[0] - start[0]
    if summary.encoded != catalog.rows.num_rows or summary.image_failures:
        raise RuntimeError(f"the flow encoded {summary.encoded} of {catalog.rows.num_rows} items: {summary.lines()}")
    t = probe.seconds
    after_stream = t.get("upsert", 0) + t.get("record_rejects", 0) + t.get("ensure_indexes", 0)
    steady_s = summary.encode_seconds - summary.first_batch_seconds
    steady_rows = round(summary.steady_items_per_s * steady_s)
    return {
        "loadavg_before": load,
        "read_catalog_s": round(read_s, 3),
        "run_s": round(run_s, 3),
        "plan_s": round(t.get("plan", 0), 3),
        "dataset_build_s": round(t.get("dataset_build", 0), 3),
        "first_batch_seconds": round(summary.first_batch_seconds, 3),
        "stream_s": round(summary.encode_seconds, 3),
        "steady_stream_s": round(steady_s, 3),
        "item_rows_s": round(t.get("item_rows", 0), 3),
        "output_batches": probe.calls.get("item_rows", 0),
        "upsert_s": round(t.get("upsert", 0), 3),
        "upsert_calls": probe.calls.get("upsert", 0),
        "record_rejects_s": round(t.get("record_rejects", 0), 3),
        "ensure_indexes_s": round(t.get("ensure_indexes", 0), 3),
        "other_s": round(run_s - t.get("plan", 0) - t.get("dataset_build", 0) - summary.encode_seconds - after_stream, 3),
        "encoded": summary.encoded,
        "items_per_s": round(summary.items_per_s, 2),
        "steady_items_per_s": round(summary.steady_items_per_s, 2),
        "steady_cpu": cpu_between(probe.first_batch_cpu, probe.last_batch_cpu, steady_rows)
        if probe.first_batch_cpu and probe.last_batch_cpu and steady_rows else None,
        "run_cpu": cpu_between(start, end, summary.encoded),
        "source_blocks": probe.source_blocks,
        "summary": summary.lines(),
        "ray_data_stats": probe.datasets[0].stats() if probe.datasets else "",
        "operators": _timeline(probe, start[0]),
        "active_items_per_s": None,
    }


def active_throughput(flow: dict) -> float | None:
    """Items / (last encoder task end - first task start of any map stage): the flow's throughput once its actors
    are up, with every pipeline effect in it (stages waiting on each other, scheduling gaps) but no start-up."""
    ops = [op for name, op in flow.get("operators", {}).items() if name.startswith("MapBatches") and "tasks" in op]
    if not ops:
        return None
    span = max(op["last_task_end_s"] for op in ops) - min(op["first_task_start_s"] for op in ops)
    return round(flow["encoded"] / span, 2) if span > 0 else None


def _timeline(probe: Probe, t0: float) -> dict:
    try:
        return operator_timeline(probe.datasets[0], t0) if probe.datasets else {}
    except Exception as e:  # noqa: BLE001 - private Ray Data API; informative only
        return {"error": f"{type(e).__name__}: {e}"}


def measure(modality: str, n: int, batch_size: int, repeats: int, quiet_s: float, work: Path, startup: dict) -> dict:
    import ray

    from featurestore.catalogs import read_catalog
    from featurestore.encode import TextTemplate, plan_resources

    folder = work / modality
    folder.mkdir()
    t0 = time.perf_counter()
    records = text_records(n) if modality == "text" else image_records(n, folder / "images")  # paths relative to folder
    catalog_path = write_jsonl(records, folder / "catalog.jsonl")
    result = {"items": n, "make_catalog_s": round(time.perf_counter() - t0, 2), "runs": []}

    stages = 1 if modality == "text" else 2  # an image catalog runs a text and an image stage
    kind = "text" if modality == "text" else "image"
    model = TEXT_MODEL if modality == "text" else IMAGE_MODEL
    resources = ray.cluster_resources()
    plan = plan_resources(resources.get("CPU", 1), resources.get("GPU", 0), stages, None, None)
    result["plan_resources"] = plan.__dict__
    startup[f"actor_start_{modality}"] = actor_start(model, kind, plan.torch_threads, plan.cpus)

    rows = read_catalog(str(catalog_path)).rows
    encoder = inputs = None
    for rep in range(repeats):
        quiet = wait_quiet(quiet_s) if quiet_s else None
        print(f"[{modality}] run {rep + 1}/{repeats}: flow, {n} items ...", file=sys.stderr, flush=True)
        flow = run_flow(catalog_path, folder / f"db{rep}", batch_size, f"bench_{modality}")
        flow["quiet_before"] = quiet
        flow["active_items_per_s"] = active_throughput(flow)
        batches = flow_batches(flow["source_blocks"], batch_size)
        assert batches[-1][1] == rows.num_rows, "the flow's source blocks do not cover the catalog"
        if encoder is None:  # loaded after the first flow run, so that run sees a driver without a model in it
            from encoders import create_encoder

            t0 = time.perf_counter()
            encoder = create_encoder(model, kind)
            result["bare_model_load_s_warm_process"] = round(time.perf_counter() - t0, 2)
            if modality == "text":
                inputs = [TextTemplate().render(r) for r in rows.to_pylist()]
            else:
                import numpy as np

                from featurestore.images import ImagePolicy, decode, fetch_bytes

                policy = ImagePolicy(roots=(str(catalog_path.parent),))  # the flow's default root
                t0 = time.perf_counter()
                inputs = np.stack([encoder.preprocess(decode(fetch_bytes(r, policy), policy.max_pixels))
                                   for r in rows.column("image_ref").to_pylist()])
                result["bare_decode_preprocess_s"] = round(time.perf_counter() - t0, 3)
        quiet = wait_quiet(quiet_s) if quiet_s else None
        print(f"[{modality}] run {rep + 1}/{repeats}: bare loop, {plan.torch_threads} torch thread(s) ...", file=sys.stderr, flush=True)
        bare = bare_loop(encoder, inputs, batches, plan.torch_threads)
        bare["quiet_before"] = quiet
        result["runs"].append({
            "flow": flow, "bare": bare,
            "ratio": round(bare["steady_items_per_s"] / flow["steady_items_per_s"], 3) if flow["steady_items_per_s"] else None,
            "ratio_active": round(bare["steady_items_per_s"] / flow["active_items_per_s"], 3) if flow["active_items_per_s"] else None,
        })

    if modality == "images":
        # context: one process on every core, and the text stage that runs beside the image stage in the flow
        print(f"[images] bare loop on all {os.cpu_count()} cores; text stage of the same items ...", file=sys.stderr, flush=True)
        result["bare_all_cores"] = bare_loop(encoder, inputs, batches, os.cpu_count())
        from encoders import create_encoder

        texts = [TextTemplate().render(r) for r in rows.to_pylist()]
        result["bare_text_stage"] = bare_loop(create_encoder(TEXT_MODEL, "text"), texts, batches, plan.torch_threads)

    best_active = max((r["flow"]["active_items_per_s"] or 0) for r in result["runs"])
    best_flow = max(r["flow"]["steady_items_per_s"] for r in result["runs"])
    best_bare = max(r["bare"]["steady_items_per_s"] for r in result["runs"])
    result["best_flow_steady_items_per_s"] = best_flow
    result["best_bare_steady_items_per_s"] = best_bare
    result["ratio_best_bare_over_best_flow"] = round(best_bare / best_flow, 3) if best_flow else None
    result["best_flow_active_items_per_s"] = best_active
    result["ratio_best_bare_over_best_active"] = round(best_bare / best_active, 3) if best_active else None
    cpu = [(r["flow"]["steady_cpu"] or {}).get("cpu_s_per_1000_items") for r in result["runs"]]
    bare_cpu = [(r["bare"]["steady_cpu"] or {}).get("cpu_s_per_1000_items") for r in result["runs"]]
    if all(cpu) and all(bare_cpu):
        result["cpu_ratio_flow_over_bare"] = round(min(cpu) / min(bare_cpu), 3)
    return result


# --------------------------------------------------------------------------------------------------------------
# report


def _f(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else format("-", fmt.split(".")[0].rstrip("f") or ">")


def tables(report: dict) -> str:
    lines = ["Throughput, items/s. bare = in-process loop, steady state (batches 2..n); flow steady = EncodeSummary's",
             "steady_items_per_s (after the first batch reaches the driver); flow active = items / span from the first",
             "map task's start to the last encoder task's end (no start-up, every pipeline effect). ratio = bare / flow",
             "(text target <= 1.15). others = cores other people's processes used meanwhile (the machine is shared);",
             "cpu/1k = CPU-seconds this benchmark's processes (driver + Ray + workers) spent per 1000 items, steady state."]
    head = (f"{'modality':<8} {'run':>4} {'items':>5} {'thr':>3} {'bare':>6} {'others':>6} {'cpu/1k':>6} | {'steady':>6} "
            f"{'active':>6} {'others':>6} {'cpu/1k':>6} | {'ratio':>5} {'r.act':>5} {'1st batch s':>11}")
    lines += [head, "-" * len(head)]
    for modality in ("text", "images"):
        r = report.get(modality)
        if not r:
            continue
        for i, run in enumerate(r["runs"]):
            b, f = run["bare"], run["flow"]
            bc, fc = b["steady_cpu"] or {}, f["steady_cpu"] or f["run_cpu"] or {}
            lines.append(
                f"{modality:<8} {i + 1:>4} {r['items']:>5} {b['threads']:>3} {b['steady_items_per_s']:>6.1f} "
                f"{_f(bc.get('other_processes_cores'), '>6.2f')} {_f(bc.get('cpu_s_per_1000_items'), '>6.2f')} | "
                f"{_f(f['steady_items_per_s'] or None, '>6.1f')} {_f(f['active_items_per_s'], '>6.1f')} "
                f"{_f(fc.get('other_processes_cores'), '>6.2f')} {_f(fc.get('cpu_s_per_1000_items'), '>6.2f')} | "
                f"{_f(run['ratio'], '>5.2f')} {_f(run['ratio_active'], '>5.2f')} {f['first_batch_seconds']:>11.2f}"
            )
        if len(r["runs"]) > 1:
            lines.append(
                f"{modality:<8} {'best':>4} {r['items']:>5} {'':>3} {r['best_bare_steady_items_per_s']:>6.1f} {'':>6} {'':>6} | "
                f"{_f(r['best_flow_steady_items_per_s'] or None, '>6.1f')} {_f(r['best_flow_active_items_per_s'] or None, '>6.1f')} "
                f"{'':>6} {'':>6} | {_f(r['ratio_best_bare_over_best_flow'], '>5.2f')} {_f(r['ratio_best_bare_over_best_active'], '>5.2f')}")
        if "bare_all_cores" in r:
            a, t = r["bare_all_cores"], r["bare_text_stage"]
            lines.append(f"{'  bare image encode on all cores:':<34} {a['threads']} threads {a['steady_items_per_s']:.1f} items/s "
                         f"(others {_f((a['steady_cpu'] or {}).get('other_processes_cores'), '.2f')})")
            lines.append(f"{'  bare text encode, same items:':<34} {t['threads']} thread  {t['steady_items_per_s']:.1f} items/s")
            lines.append(f"{'  bare decode+preprocess, 1 core:':<34} {r['items'] / r['bare_decode_preprocess_s']:.1f} items/s")
    lines += ["", "Inside the flow: encoder stages from Ray Data's per-block stats (seconds from the start of EncodeJob.run)"]
    head = (f"{'modality':<8} {'run':>3} {'stage':<14} {'tasks':>5} {'1st task':>8} {'compute it/s':>12} {'cpu/wall':>8} "
            f"{'steady it/s':>11} {'busy':>5} {'gaps s':>6}")
    lines += [head, "-" * len(head)]
    for modality in ("text", "images"):
        r = report.get(modality)
        if not r:
            continue
        for i, run in enumerate(r["runs"]):
            for name, op in run["flow"].get("operators", {}).items():
                if "Embedder" not in name and "Loader" not in name:
                    continue
                stage = name.replace("MapBatches(", "").rstrip(")")
                lines.append(
                    f"{modality:<8} {i + 1:>3} {stage:<14} {op['tasks']:>5} {op['first_task_start_s']:>8.2f} "
                    f"{_f(op.get('compute_items_per_s'), '>12.1f')} {op['cpu_s'] / op['busy_s'] if op['busy_s'] else 0:>8.2f} "
                    f"{_f(op.get('steady_items_per_s'), '>11.1f')} {_f(op.get('steady_busy_fraction'), '>5.2f')} "
                    f"{_f(op.get('gaps_s'), '>6.2f')}")
    lines += ["  1st task = when the stage's first task started (actor start + model load happen before it);",
              "  compute it/s = rows / summed task wall time; cpu/wall = cores the stage's tasks used on average;",
              "  steady it/s = rows of tasks 2..n / span from the first task's end to the last task's end;",
              "  busy = share of that span with a task running (> 1: tasks ran in parallel); gaps = idle time between tasks."]
    s = report["startup"]
    lines += ["", "Start-up, seconds", f"  ray.init                          {s['ray_init_s']:.2f}"]
    for key, label in (("actor_start_text", "text"), ("actor_start_images", "image")):
        if key in s:
            a = s[key]
            lines.append(f"  {label + ' actor start + model load':<33} {a['total_s']:.2f}  (worker start {a['worker_start_s']:.2f}, "
                         f"imports {a['imports_s']:.2f}, model load {a['model_load_s']:.2f})")
    lines += ["", "Where the flow's wall time goes, seconds (each flow run)"]
    head = (f"{'modality':<8} {'run':>3} {'read':>5} {'plan':>5} {'build':>5} {'to 1st':>6} {'steady':>6} {'(rows)':>6} "
            f"{'write':>5} {'rej+ix':>6} {'total':>6} {'bare enc':>8}")
    lines += [head, "-" * len(head)]
    for modality in ("text", "images"):
        r = report.get(modality)
        if not r:
            continue
        for i, run in enumerate(r["runs"]):
            f = run["flow"]
            lines.append(
                f"{modality:<8} {i + 1:>3} {f['read_catalog_s']:>5.2f} {f['plan_s']:>5.2f} {f['dataset_build_s']:>5.2f} "
                f"{f['first_batch_seconds']:>6.2f} {f['steady_stream_s']:>6.2f} {f['item_rows_s']:>6.2f} {f['upsert_s']:>5.2f} "
                f"{f['record_rejects_s'] + f['ensure_indexes_s']:>6.2f} {f['read_catalog_s'] + f['run_s']:>6.2f} "
                f"{run['bare']['seconds']:>8.2f}"
            )
    lines += ["  read = read_catalog; plan = render/hash/diff on the driver; build = Ray Data plan; to 1st = from the start",
              "  of iteration to the first encoded batch on the driver (start-up: actor + model load, + one block's compute);",
              "  steady = rest of the stream; (rows) = driver-side row conversion (inside the stream); write = LanceDB",
              "  create/merge_insert; rej+ix = reject records + ANN index upkeep; bare enc = bare loop's encode time, same items."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-items", type=int, default=5000)
    p.add_argument("--image-items", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text-repeats", type=int, default=2, help="flow + bare loop pairs for text")
    p.add_argument("--image-repeats", type=int, default=1)
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each measurement wait up to this many seconds for other processes to go quiet")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "encode_throughput.json"))
    p.add_argument("--ray-stats", action="store_true", help="print Ray Data's per-operator stats of each flow run")
    args = p.parse_args(argv)

    import ray

    t0 = time.perf_counter()
    ensure_ray()
    startup = {"ray_init_s": round(time.perf_counter() - t0, 2)}

    import lancedb  # after ray.init
    import torch

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "gpu": torch.cuda.is_available(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                    "lancedb": lancedb.__version__, "ray_cluster_cpus": ray.cluster_resources().get("CPU")},
        "args": vars(args),
        "startup": startup,
    }
    with tempfile.TemporaryDirectory(prefix="encode_bench_") as tmp:
        work = Path(tmp)
        if args.text_items:
            report["text"] = measure("text", args.text_items, args.batch_size, args.text_repeats, args.wait_quiet, work, startup)
        if args.image_items:
            report["images"] = measure("images", args.image_items, args.batch_size, args.image_repeats, args.wait_quiet, work, startup)
    ray.shutdown()

    print(tables(report))
    if args.ray_stats:
        for modality in ("text", "images"):
            for i, run in enumerate(report.get(modality, {}).get("runs", [])):
                print(f"\n--- Ray Data stats: {modality} run {i + 1} ---\n{run['flow']['ray_data_stats']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
