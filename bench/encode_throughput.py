"""Encoding-flow throughput vs a bare in-process loop over the same encoders, batch size and torch thread count.

    RAY_AUTH_MODE=token .venv/bin/python bench/encode_throughput.py                  # 5000 text items, 3000 images
    RAY_AUTH_MODE=token .venv/bin/python bench/encode_throughput.py --text-items 1000 --image-items 0

The real encoders (all-MiniLM-L6-v2, tf_efficientnet_lite0). Per modality (a text-only catalog; an image catalog
whose items also carry text):

* bare loop: `create_encoder(...).encode(batch)` in this process over the catalog's rows in order, --batch-size at
  a time, with `torch.set_num_threads` set to the count `plan_resources` gives the flow's actors. Steady state =
  every batch after the first. For images the bare work of both modalities is 1 / (1/image rate + 1/text rate):
  the flow encodes every image item's text too.
* flow: `encode_catalog(...)` (what flows/encode_items.py runs) into a fresh LanceDB, in this process's Ray
  instance. Its own `EncodeSummary` says where the time went: `phases` (recover, stream, commit, merge, index),
  `first_batch_seconds` (start-up: scheduling, the plan's joins, actor start, model load, the first writer batch)
  and `steady_items_per_s` (after the first writer result). Nothing of the flow is patched or wrapped.
* ratio = bare steady items/s / flow steady items/s (the flow's overhead; target <= 1.15).
* start-up, reported apart: `ray.init` (by `ensure_ray`, as in the flow), and a bare Ray actor that imports the
  encoder and loads the model (the work an encoder actor does before its first batch).

The machine is shared: the load average before each measurement and the cores other processes used during each
flow run are recorded; numbers taken while other work ran are not comparable.
"""
from __future__ import annotations

import argparse
import json
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


def text_records(n: int, seed: int = 0, revised_every: int = 0):
    """n catalog records (a generator: 1M of them need not sit in memory) from the MovieLens-1M movies (titles,
    years, genres), repeated as re-releases, each with a generated one- or two-sentence description, so every item
    has a different text of realistic length. revised_every k > 0: every k-th item's description gets one more
    sentence, the same catalog with 1/k of its items changed (the seed keeps every other record as it was)."""
    from featurestore.movielens import load_items

    movies = load_items("ml-1m").to_dict("records")
    rng = random.Random(seed)
    for i in range(n):
        movie, edition = movies[i % len(movies)], i // len(movies)
        year = movie["year"] if movie["year"] == movie["year"] and movie["year"] is not None else None
        genres = movie["genres"] or ["Drama"]
        title = movie["title"] + EDITIONS[edition % len(EDITIONS)] + (f" ({year})" if year else "")
        description = (
            f"A {rng.choice(ADJECTIVES)} {genres[0].lower()} {rng.choice(NOUNS)}"
            f"{' from ' + str(year) if year else ''} about {rng.choice(PLOTS)}.{rng.choice(EXTRAS)}"
        )
        if revised_every and i % revised_every == 0:
            description += " Now with a new commentary track."
        yield {"item_id": f"m{i:07d}", "title": title, "description": description, "categories": genres}


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


def write_jsonl(records, path: Path) -> Path:
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
# measurements


def bare_loop(encoder, inputs, batch_size: int, threads: int) -> dict:
    """Encode `inputs` batch_size at a time in this process with `threads` torch threads; steady = batches 2..n."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        load = loadavg()
        times = []
        for start in range(0, len(inputs), batch_size):
            t0 = time.perf_counter()
            encoder.encode(inputs[start:start + batch_size])
            times.append(time.perf_counter() - t0)
            if len(times) == 1:
                steady_start = cpu_snapshot()
        steady_end = cpu_snapshot()
    finally:
        torch.set_num_threads(before)
    n, steady_rows = len(inputs), len(inputs) - min(batch_size, len(inputs))
    return {
        "threads": threads,
        "batches": len(times),
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


def run_flow(catalog_path: Path, db_dir: Path, batch_size: int, table: str) -> dict:
    """The flow as the command line runs it; its summary's counts and phases, and the CPU this benchmark's process
    tree (driver, Ray, workers) and everybody else's processes used meanwhile."""
    from featurestore.encode import encode_catalog

    load = loadavg()
    start = cpu_snapshot()
    summary = encode_catalog(str(catalog_path), db_uri=str(db_dir), table=table, text_model=TEXT_MODEL,
                             image_model=IMAGE_MODEL, batch_size=batch_size)
    end = cpu_snapshot()
    if summary.rejected_whole or summary.image_failures:
        raise RuntimeError(f"the flow rejected or failed items: {summary.lines()}")
    return {
        "loadavg_before": load, "loadavg_after": loadavg(),
        "run_s": round(end[0] - start[0], 3),
        "encoded": summary.encoded,
        "phases_s": {name: round(s, 3) for name, s in summary.phases.items()},
        "first_batch_seconds": round(summary.first_batch_seconds, 3),
        "steady_items_per_s": summary.steady_items_per_s and round(summary.steady_items_per_s, 2),
        "stream_items_per_s": round(summary.encoded / summary.phases["stream"], 2),
        "run_cpu": cpu_between(start, end, summary.encoded),
    }


def measure(modality: str, n: int, batch_size: int, repeats: int, quiet_s: float, work: Path, startup: dict) -> dict:
    import numpy as np
    import ray

    from encoders import create_encoder
    from featurestore.catalogs import open_catalog
    from featurestore.encode import TextTemplate, plan_resources

    folder = work / modality
    folder.mkdir()
    t0 = time.perf_counter()
    records = text_records(n) if modality == "text" else image_records(n, folder / "images")  # paths relative to folder
    catalog_path = write_jsonl(records, folder / "catalog.jsonl")
    result = {"items": n, "make_catalog_s": round(time.perf_counter() - t0, 2), "runs": []}

    # a JSONL catalog runs an image and a text stage whether or not its rows carry images
    resources = ray.cluster_resources()
    plan = plan_resources(resources.get("CPU", 1), resources.get("GPU", 0), 2, None, None)
    result["plan_resources"] = plan.__dict__
    kind, model = ("text", TEXT_MODEL) if modality == "text" else ("image", IMAGE_MODEL)
    startup[f"actor_start_{modality}"] = actor_start(model, kind, plan.torch_threads, plan.cpus)

    rows = open_catalog(str(catalog_path), "auto", None).read_local()  # the rows the flow reads, without Ray
    texts = [TextTemplate().render(r) for r in rows.to_pylist()]
    encoder = inputs = None
    for rep in range(repeats):
        quiet = wait_quiet(quiet_s) if quiet_s else None
        print(f"[{modality}] run {rep + 1}/{repeats}: flow, {n} items ...", file=sys.stderr, flush=True)
        flow = run_flow(catalog_path, folder / f"db{rep}", batch_size, f"bench_{modality}")
        flow["quiet_before"] = quiet
        if encoder is None:  # loaded after the first flow run, so that run sees a driver without a model in it
            t0 = time.perf_counter()
            encoder = create_encoder(model, kind)
            result["bare_model_load_s_warm_process"] = round(time.perf_counter() - t0, 2)
            if modality == "text":
                inputs = texts
            else:
                from featurestore.images import ImagePolicy, decode, fetch_bytes

                policy = ImagePolicy(roots=(str(catalog_path.parent),))  # the flow's default root
                t0 = time.perf_counter()
                inputs = np.stack([encoder.preprocess(decode(fetch_bytes(r, policy), policy.max_pixels))
                                   for r in rows.column("image_ref").to_pylist()])
                result["bare_decode_preprocess_s"] = round(time.perf_counter() - t0, 3)
        quiet = wait_quiet(quiet_s) if quiet_s else None
        print(f"[{modality}] run {rep + 1}/{repeats}: bare loop, {plan.torch_threads} torch thread(s) ...",
              file=sys.stderr, flush=True)
        bare = bare_loop(encoder, inputs, batch_size, plan.torch_threads)
        bare["quiet_before"] = quiet
        if modality == "images":  # the flow encodes every image item's text as well: bare work for both
            text_stage = bare_loop(create_encoder(TEXT_MODEL, "text"), texts, batch_size, plan.torch_threads)
            bare["text_stage"] = text_stage
            bare["both_steady_items_per_s"] = round(
                1 / (1 / bare["steady_items_per_s"] + 1 / text_stage["steady_items_per_s"]), 2)
        result["runs"].append({"flow": flow, "bare": bare, **ratios(flow, bare)})
    stream_ratios = [r["ratio_stream"] for r in result["runs"]]
    result["best_ratio_stream"] = min(stream_ratios) if stream_ratios else None
    return result


def ratios(flow: dict, bare: dict) -> dict:
    """bare / flow: over the whole stream phase (start-up included, so an upper bound on the overhead), and over
    the flow's steady state where the flow measured one (featurestore.encode.steady_rate: not where the writers'
    results reached the driver in a burst)."""
    reference = bare.get("both_steady_items_per_s", bare["steady_items_per_s"])
    steady = flow["steady_items_per_s"]
    return {"ratio_stream": round(reference / flow["stream_items_per_s"], 3),
            "ratio_steady": round(reference / steady, 3) if steady else None}


# --------------------------------------------------------------------------------------------------------------
# report


def _f(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def tables(report: dict) -> str:
    lines = ["Throughput, items/s. bare = in-process loop, steady state (batches 2..n; images: both modalities,",
             "1 / (1/image + 1/text)); flow steady = EncodeSummary.steady_items_per_s (after the first writer result);",
             "flow stream = encoded / the stream phase (start-up included). ratio = bare / flow (target <= 1.15); the",
             "steady ratio only where the steady window is at least half the stream (`ratios`).",
             "others = cores other people's processes used during the flow run (the machine is shared).", "",
             "| modality | run | items | threads | bare | flow steady | flow stream | ratio (stream) | ratio (steady) | 1st batch s | recover | "
             "stream | commit | merge | index | others | load before |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for modality in ("text", "images"):
        r = report.get(modality)
        for i, run in enumerate((r or {}).get("runs", [])):
            b, f = run["bare"], run["flow"]
            p = f["phases_s"]
            lines.append(
                f"| {modality} | {i + 1} | {r['items']} | {b['threads']} | "
                f"{b.get('both_steady_items_per_s', b['steady_items_per_s']):.1f} | {_f(f['steady_items_per_s'] or None, '.1f')} | "
                f"{f['stream_items_per_s']:.1f} | {run['ratio_stream']:.2f} | {_f(run['ratio_steady'], '.2f')} | "
                f"{f['first_batch_seconds']:.1f} | "
                + " | ".join(f"{p.get(k, 0):.1f}" for k in ("recover", "stream", "commit", "merge", "index"))
                + f" | {f['run_cpu']['other_processes_cores']:.2f} | {f['loadavg_before']:.2f} |")
    images = report.get("images")
    if images:
        b = images["runs"][0]["bare"]
        lines += ["", f"images, bare: image encoder {b['steady_items_per_s']:.1f} items/s, text encoder on the same items "
                  f"{b['text_stage']['steady_items_per_s']:.1f} items/s ({b['threads']} threads); decode + preprocess "
                  f"on 1 core {images['items'] / images['bare_decode_preprocess_s']:.1f} items/s"]
    s = report["startup"]
    lines += ["", "Start-up, seconds", f"  ray.init                          {s['ray_init_s']:.2f}"]
    for key, label in (("actor_start_text", "text"), ("actor_start_images", "image")):
        if key in s:
            a = s[key]
            lines.append(f"  {label + ' actor start + model load':<33} {a['total_s']:.2f}  (worker start {a['worker_start_s']:.2f}, "
                         f"imports {a['imports_s']:.2f}, model load {a['model_load_s']:.2f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-items", type=int, default=5000)
    p.add_argument("--image-items", type=int, default=3000,
                   help="enough for several writer batches (1,024 rows each), so that the flow has a steady state")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text-repeats", type=int, default=2, help="flow + bare loop pairs for text")
    p.add_argument("--image-repeats", type=int, default=1)
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each measurement wait up to this many seconds for other processes to go quiet")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "encode_throughput.json"))
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
