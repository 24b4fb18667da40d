"""Forward + backward cost of one training batch for SASRec, FAME and HM4SR.

Per case (device, model, L, n_items, training mode): median wall time and median process CPU
time of `loss(batch)` + `backward()` over --reps steps after --warmup steps, and the peak memory
those steps add:
CUDA: torch.cuda.max_memory_allocated above what was allocated before; CPU: peak RSS (VmHWM,
reset through /proc/self/clear_refs) above the RSS before. Each case runs in a fresh spawned
process so allocator caches and earlier peaks do not leak between cases.

On a shared CPU machine wall time swings with other load; CPU time much less, so the CPU cost
relative to SASRec is computed from CPU time (CUDA: from wall time). OpenMP threads wait
passively (OMP_WAIT_POLICY=PASSIVE unless set) so spinning on contended cores is not counted.

Models run with their default configs (training mode, dropout on) at --hidden-size; HM4SR uses
id + text with a random 384-d text matrix and 18 random multi-hot categories (all auxiliary
losses on). Sequences are full (every position valid). Modes: "last" = loss on the last
position's target; "all" = loss at every position (target_seq).

    python bench/model_step.py --quick            # a few minutes on 2 CPU cores
    python bench/model_step.py                    # the full grid (CPU and, when present, CUDA)
    python bench/model_step.py --devices cuda --seq-lens 200 --out /tmp/step.json
    python bench/model_step.py --seq-lens 200 --n-items 3706 --modes all --precisions fp32 bf16
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.precision import PRECISIONS  # noqa: E402 - after the path insert

MODEL_NAMES = ("sasrec", "fame", "hm4sr")
TEXT_DIM, N_CATEGORIES = 384, 18


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def make_batch(batch_size: int, length: int, n_items: int, mode: str, device: str) -> dict[str, torch.Tensor]:
    item_seq = torch.randint(1, n_items + 1, (batch_size, length))
    batch = {
        "item_seq": item_seq,
        "time_seq": torch.cumsum(torch.randint(0, 86400 * 30, (batch_size, length)), dim=1),
        "seq_len": torch.full((batch_size,), length),
        "target": torch.randint(1, n_items + 1, (batch_size,)),
    }
    if mode == "all":
        batch["target_seq"] = torch.cat([item_seq[:, 1:], batch["target"][:, None]], dim=1)
    return {name: value.to(device) for name, value in batch.items()}


def run_case(case: dict) -> dict:
    """One (device, model, L, n_items, mode) measurement; runs in its own process."""
    from recmodels import MODELS, DataFacts, ItemFeatures, create_model
    from training.precision import autocast

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    device, n_items, length = case["device"], case["n_items"], case["seq_len"]
    # a store of random text features and categories (no images), with gaps of up to 30 days
    synthetic = {"text": torch.randn(n_items + 1, TEXT_DIM),
                 "categories": (torch.rand(n_items + 1, N_CATEGORIES) < 0.1).float()}
    for matrix in synthetic.values():
        matrix[0] = 0  # padding row
    config_class, given = MODELS[case["model"]].config_class, {"hidden_size": case["hidden_size"]}
    needs = config_class.store_needs(given)
    config = config_class.from_data(given, DataFacts(length, tuple(f for f in needs.features if f in synthetic),
                                                     max_gap_s=86400 * 30))
    used = {name: synthetic[name] for name in config.item_features()}
    model = create_model(case["model"], config, n_items, ItemFeatures(**used) if used else None).to(device).train()
    batch = make_batch(case["batch_size"], length, n_items, case["mode"], device)

    def step() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        with autocast(case["precision"], device):
            total, _ = model.loss(batch)
        total.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory_before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset the peak-RSS mark to the current RSS
        memory_before = proc_status_kib("VmRSS") * 1024
    for _ in range(case["warmup"]):
        step()
    wall_times, cpu_times = zip(*(step() for _ in range(case["reps"])))
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - memory_before
    else:
        peak = proc_status_kib("VmHWM") * 1024 - memory_before
    return {**case, "wall_ms": 1000 * statistics.median(wall_times), "cpu_ms": 1000 * statistics.median(cpu_times),
            "wall_ms_all": [round(1000 * t, 1) for t in wall_times], "peak_mib": peak / 2**20,
            "n_parameters": sum(p.numel() for p in model.parameters()), "load_average": os.getloadavg()[0]}


def add_relative_costs(results: list[dict]) -> None:
    def key(r):
        return r["device"], r["seq_len"], r["n_items"], r["mode"], r["precision"]

    def cost(r):
        return r["wall_ms"] if r["device"] == "cuda" else r["cpu_ms"]

    baselines = {key(r): r for r in results if r["model"] == "sasrec" and "error" not in r}
    for r in results:
        base = baselines.get(key(r))
        if base and "error" not in r:
            r["time_vs_sasrec"] = cost(r) / cost(base)
            r["memory_vs_sasrec"] = r["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else None


def format_table(results: list[dict]) -> str:
    header = ["device", "L", "n_items", "mode", "precision", "model", "wall ms", "cpu ms", "x SASRec", "peak MiB", "x SASRec"]
    rows = [header]
    for r in results:
        if "error" in r:
            rows.append([r["device"], r["seq_len"], r["n_items"], r["mode"], r["precision"], r["model"],
                         "error: " + r["error"], "", "", "", ""])
            continue
        ratio = r.get("time_vs_sasrec")
        mem_ratio = r.get("memory_vs_sasrec")
        rows.append([r["device"], r["seq_len"], r["n_items"], r["mode"], r["precision"], r["model"], f"{r['wall_ms']:.0f}", f"{r['cpu_ms']:.0f}",
                     f"{ratio:.2f}" if ratio else "-", f"{r['peak_mib']:.0f}", f"{mem_ratio:.2f}" if mem_ratio else "-"])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = [" | ".join(str(cell).rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[50, 200])
    parser.add_argument("--n-items", nargs="+", type=int, default=[3706, 100000])
    parser.add_argument("--modes", nargs="+", default=["last", "all"], choices=["last", "all"])
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=list(PRECISIONS),
                        help="autocast of the forward pass (fp16: CUDA only)")
    parser.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                        help="default: cpu, plus cuda when available")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads per case")
    parser.add_argument("--quick", action="store_true",
                        help="L=50 and 3706 items only, 2 timed reps: a few minutes on 2 cores")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "model_step.json")
    args = parser.parse_args(argv)
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.quick:
        args.seq_lens, args.n_items, args.reps = [50], [3706], 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cases = [dict(device=device, seq_len=length, n_items=n_items, mode=mode, precision=precision, model=model,
                  batch_size=args.batch_size, hidden_size=args.hidden_size, warmup=args.warmup,
                  reps=args.reps, threads=args.threads)
             for device, length, n_items, mode, precision, model
             in itertools.product(args.devices, args.seq_lens, args.n_items, args.modes, args.precisions, args.models)
             if not (precision == "fp16" and device == "cpu")]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by the spawned children's OpenMP
    results = []
    spawn = multiprocessing.get_context("spawn")  # a fresh process per case: clean peaks, no fork of torch threads
    for case in cases:
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            try:
                result = pool.submit(run_case, case).result()
            except Exception as error:  # e.g. out of memory: keep the other cases
                result = {**case, "error": f"{type(error).__name__}: {error}"[:120]}
        results.append(result)
        print({k: result.get(k) for k in ("device", "seq_len", "n_items", "mode", "precision", "model", "wall_ms",
                                          "cpu_ms", "peak_mib", "load_average", "error") if k in result}, flush=True)
    add_relative_costs(results)
    print(format_table(results))
    print("x SASRec: CPU time ratio on cpu, wall time ratio on cuda; peak = memory added by the steps")
    meta = {"torch": torch.__version__, "threads": args.threads, "cpu_count": os.cpu_count(),
            "cuda_device": torch.cuda.get_device_name() if "cuda" in args.devices else None,
            "batch_size": args.batch_size, "hidden_size": args.hidden_size,
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
