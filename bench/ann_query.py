"""ANN query latency and recall@k on LanceDB: the index the pipeline builds (HNSW-SQ) vs IVF-PQ.

    .venv/bin/python bench/ann_query.py                      # 100k x 384, 200 queries
    .venv/bin/python bench/ann_query.py --rows 20000 --queries 50

Data: unit-normalised 384-d vectors from a Gaussian mixture that looks like sentence embeddings more than noise
does: --clusters centres with Zipf-like sizes; around each centre a cluster-specific low-rank (--rank) Gaussian
(per-axis std --spread) plus a little isotropic noise, then L2-normalised (at the defaults the mean cosine of a
query to its nearest neighbour is ~0.73 and to its 10th ~0.63, in the range of sentence-embedding neighbours).
Queries are fresh draws from the same mixture (not in the table).

Ground truth: exact cosine top-k by numpy (dot products of unit vectors). Each configuration is timed one query at a
time through the synchronous LanceDB API (`table.search(q).distance_type("cosine")...limit(k).to_arrow()`),
after a few warm-up queries; latency is wall time per query as the caller sees it.

Configurations: exact search (`bypass_vector_index()`), IVF-PQ (`IvfPq(distance_type="cosine")`, LanceDB's
defaults) over a grid of nprobes / refine_factor, and the pipeline's index (`featurestore.store.vector_index`,
HNSW-SQ with LanceDB's defaults) over a grid of ef; `store.nearest` searches it at ef = 3k. Index build times are
reported. The machine may be shared: every row says how many cores other processes used meanwhile ("others").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")  # index stats without the centroid matrix


def mixture(n: int, dim: int, clusters: int, rank: int, spread: float, rng: np.random.Generator, centres=None, bases=None,
            weights=None):
    """n unit vectors from the mixture; returns (vectors, cluster ids, (centres, bases, weights)) so that queries
    can be drawn from the same mixture."""
    if centres is None:
        centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        bases = rng.standard_normal((clusters, rank, dim)).astype(np.float32) / np.sqrt(dim)
        weights = 1.0 / np.arange(1, clusters + 1) ** 0.7  # Zipf-like cluster sizes
        weights /= weights.sum()
    labels = rng.choice(clusters, size=n, p=weights)
    z = rng.standard_normal((n, rank)).astype(np.float32) * spread
    x = centres[labels] + np.einsum("nr,nrd->nd", z, bases[labels])
    x += rng.standard_normal((n, dim)).astype(np.float32) * (0.12 / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels, (centres, bases, weights)


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = queries @ data.T
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def cpu_mark() -> tuple[float, float, int]:
    """(time, this process's CPU seconds, machine busy ticks): to tell how much CPU other processes took."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    t = os.times()
    return time.perf_counter(), t.user + t.system, v[0] + v[1] + v[2] + v[5] + v[6]


def others_cores(a, b) -> float:
    """Cores used by other processes between two marks (the machine is shared)."""
    wall = b[0] - a[0]
    return round(max(0.0, (b[2] - a[2]) / os.sysconf("SC_CLK_TCK") - (b[1] - a[1])) / wall, 2) if wall > 0 else 0.0


def run_queries(table, queries: np.ndarray, k: int, truth: np.ndarray, warmup: int, **settings) -> dict:
    def search(q):
        query = table.search(q, vector_column_name="text_emb").distance_type("cosine").select(["id", "_distance"]).limit(k)
        if settings.get("exact"):
            query = query.bypass_vector_index()
        if settings.get("nprobes"):
            query = query.nprobes(settings["nprobes"])
        if settings.get("refine_factor"):
            query = query.refine_factor(settings["refine_factor"])
        if settings.get("ef"):
            query = query.ef(settings["ef"])
        return query.to_arrow()

    for q in queries[:warmup]:
        search(q)
    latencies, recalls = [], []
    mark = cpu_mark()
    for q, true_ids in zip(queries, truth):
        start = time.perf_counter()
        result = search(q)
        latencies.append(time.perf_counter() - start)
        found = set(result.column("id").to_pylist())
        recalls.append(len(found & set(true_ids.tolist())) / k)
    others = others_cores(mark, cpu_mark())
    ms = np.array(latencies) * 1000
    return {
        "other_processes_cores": others,
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        f"recall@{k}": round(float(np.mean(recalls)), 4),
        f"min_recall@{k}": round(float(np.min(recalls)), 2),
    }


def index_info(table) -> dict:
    info = {}
    for index in table.list_indices():
        try:
            stats = table.index_stats(index.name)
            info = {"name": index.name, "type": str(getattr(stats, "index_type", index.index_type)),
                    "num_indices": getattr(stats, "num_indices", None),
                    "num_indexed_rows": getattr(stats, "num_indexed_rows", None)}
        except Exception as e:  # noqa: BLE001 - stats are informative only
            info = {"name": index.name, "type": str(index.index_type), "stats_error": str(e)}
    return info


def index_params(table) -> dict:
    """num_partitions / sub-index parameters as lance reports them (informative)."""
    try:
        stats = table.to_lance().stats.index_stats(table.list_indices()[0].name)
        segment = (stats.get("segments") or stats.get("indices") or [{}])[0]
        sub = segment.get("sub_index") or {}
        return {
            "index_type": stats.get("index_type"),
            "metric": segment.get("metric_type"),
            "num_partitions": segment.get("num_partitions"),
            "sub_index": {k: v for k, v in sub.items() if k not in ("metric_type", "transposed")} if isinstance(sub, dict) else str(sub),
        }
    except Exception as e:  # noqa: BLE001 - informative only
        return {"error": str(e)[:200]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--clusters", type=int, default=200)
    p.add_argument("--rank", type=int, default=24, help="intrinsic dimension of each cluster")
    p.add_argument("--spread", type=float, default=0.3, help="per-axis std of the in-cluster low-rank part")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "ann_query.json"))
    args = p.parse_args(argv)

    import lancedb

    from featurestore import store
    from featurestore.encode import ensure_indexes

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    data, _, params = mixture(args.rows, args.dim, args.clusters, args.rank, args.spread, rng)
    queries, _, _ = mixture(args.queries, args.dim, args.clusters, args.rank, args.spread, rng, *params)
    truth = exact_topk(data, queries, args.k)
    gen_s = time.perf_counter() - t0
    nn_cos = float(np.mean(np.take_along_axis(queries @ data.T, truth[:, :1], axis=1)))
    tenth_cos = float(np.mean(np.take_along_axis(queries @ data.T, truth[:, -1:], axis=1)))

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "lancedb": lancedb.__version__,
                    "loadavg_start": round(os.getloadavg()[0], 2)},
        "args": vars(args),
        "data": {"generate_s": round(gen_s, 2), "mean_cosine_nn1": round(nn_cos, 4), "mean_cosine_nn10": round(tenth_cos, 4)},
        "builds": {},
        "results": [],
    }
    k = args.k
    with tempfile.TemporaryDirectory(prefix="ann_bench_") as tmp:
        db = lancedb.connect(tmp)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), args.dim)
        # the pipeline's schema has both vector columns; image_emb stays null here, so ensure_indexes skips it
        no_images = pa.nulls(args.rows, pa.list_(pa.float32(), 1280))
        table = db.create_table("vecs", pa.table({"id": pa.array(np.arange(args.rows), pa.int64()), "text_emb": vectors,
                                                  "image_emb": no_images}), on_bad_vectors="null")

        def record(config: str, **settings):
            r = run_queries(table, queries, k, truth, args.warmup, **settings)
            row = {"config": config, "settings": {s: v for s, v in settings.items() if v}, **r}
            report["results"].append(row)
            print(f"  {config:<8} {json.dumps(row['settings']):<40} p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  "
                  f"recall@{k} {r[f'recall@{k}']:.4f}  (others {r['other_processes_cores']:.2f} cores)", flush=True)

        print(f"{args.rows} x {args.dim} vectors, {args.queries} queries; mean cosine to NN1 {nn_cos:.3f}, to NN{k} {tenth_cos:.3f}")
        record("exact", exact=True)

        # 1. IVF-PQ with LanceDB's defaults (the pipeline's index before this benchmark)
        mark = cpu_mark()
        table.create_index("text_emb", config=lancedb.index.IvfPq(distance_type="cosine"))
        end = cpu_mark()
        report["builds"]["ivf_pq"] = {"seconds": round(end[0] - mark[0], 2), "other_processes_cores": others_cores(mark, end),
                                      "index": index_info(table), "params": index_params(table)}
        print(f"IVF-PQ (LanceDB defaults) built in {report['builds']['ivf_pq']['seconds']} s: {report['builds']['ivf_pq']['params']}")
        # default nprobes is 20, i.e. every partition of a ~100k-row index (num_partitions = rows / 8192 = 12)
        for nprobes in (None, 3, 6):
            for refine in (None, 5, 10, 20):
                record("ivf_pq", nprobes=nprobes, refine_factor=refine)

        # 2. the pipeline's index: ensure_indexes -> store.vector_index("cosine") = HNSW-SQ
        table.drop_index(table.list_indices()[0].name)
        mark = cpu_mark()
        done = ensure_indexes(table, min_rows=1)
        end = cpu_mark()
        report["builds"]["hnsw_sq"] = {"seconds": round(end[0] - mark[0], 2), "other_processes_cores": others_cores(mark, end),
                                       "columns": done, "index": index_info(table), "params": index_params(table)}
        print(f"HNSW-SQ built in {report['builds']['hnsw_sq']['seconds']} s: {report['builds']['hnsw_sq']['params']}")
        # at ~100k rows the index has one IVF partition, so nprobes does nothing; ef must be >= k x refine_factor
        for ef in (None, 20, store.ANN_EF_PER_RESULT * k, 50, 100):
            record("hnsw_sq", ef=ef)
        record("hnsw_sq", ef=5 * k, refine_factor=5)

    report["machine"]["loadavg_end"] = round(os.getloadavg()[0], 2)
    print()
    print(table_text(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0


def table_text(report: dict) -> str:
    k = report["args"]["k"]
    lines = [f"{report['args']['rows']} x {report['args']['dim']} (cosine), {report['args']['queries']} queries, k={k}; "
             f"load avg {report['machine']['loadavg_start']} -> {report['machine'].get('loadavg_end')}"]
    for name, build in report["builds"].items():
        lines.append(f"build {name}: {build['seconds']} s (others {build['other_processes_cores']} cores) {build.get('params')}")
    head = (f"{'index':<8} {'nprobes':>7} {'refine':>6} {'ef':>5} {'p50 ms':>8} {'p99 ms':>8} {'recall@' + str(k):>9} "
            f"{'min rec':>7} {'others':>6}")
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        s = r["settings"]
        lines.append(f"{r['config']:<8} {s.get('nprobes', '-'):>7} {s.get('refine_factor', '-'):>6} {s.get('ef', '-'):>5} "
                     f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r[f'recall@{k}']:>9.4f} {r[f'min_recall@{k}']:>7.2f} "
                     f"{r['other_processes_cores']:>6.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
