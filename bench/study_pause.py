"""The study's pauses: the test suite needs the machine's 2 cores, so the study is stopped (SIGSTOP) while it runs.

    python bench/study_pause.py stop --storage ~/study-data/runs    # every process of bench/study.sh stops
    python bench/study_pause.py cont --storage ~/study-data/runs    # and goes on

A paused epoch's wall-clock seconds hold the pause, so each pause is logged (UTC start and end) in the study's
storage folder, `pauses.log`, which bench/study_ledger.py carries with the storage copy; bench/study_table.py and
bench/time_to_quality.py take the logged pauses out of the epochs they overlap. The signals go to
the session of bench/study.sh (run it with setsid), so nothing else on the machine stops.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

PAUSES_FILE = "pauses.log"
SIGNALS = {"stop": "STOP", "cont": "CONT"}


def read_pauses(storage: str | Path) -> list[tuple[float, float]]:
    """The logged pauses under `storage` as (start, end) Unix seconds: each stop with the cont that follows it.
    A stop with none (the session ended while the study was paused, and the study with it) was no pause of any
    epoch that was recorded."""
    path = Path(storage).expanduser() / PAUSES_FILE
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    events = sorted((datetime.fromisoformat(stamp).timestamp(), action) for stamp, action in lines)
    return [(stamp, after) for (stamp, action), (after, then) in zip(events, events[1:])
            if (action, then) == ("stop", "cont")]


def paused_s(pauses: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] the study was paused."""
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in pauses)


def paused_in_epochs(spans, pauses: list[tuple[float, float]]) -> float:
    """Seconds the study was paused within epochs given as (started at, seconds)."""
    return sum(paused_s(pauses, start, start + seconds) for start, seconds in spans)


def signal_study(action: str, storage: Path) -> str:
    """Signal every process of bench/study.sh's session and log it; the session id."""
    found = subprocess.run(["pgrep", "-o", "-f", "bench/study.sh"], capture_output=True, text=True).stdout.split()
    if not found:
        raise SystemExit("error: no bench/study.sh is running")
    session = subprocess.run(["ps", "-o", "sid=", "-p", found[0]], capture_output=True, text=True).stdout.strip()
    subprocess.run(["pkill", f"-{SIGNALS[action]}", "-s", session], check=False)
    storage.mkdir(parents=True, exist_ok=True)
    with (storage / PAUSES_FILE).open("a") as log:
        log.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {action}\n")
    return session


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=sorted(SIGNALS))
    parser.add_argument("--storage", type=Path, required=True, help="the study's storage folder (STUDY_DATA/runs)")
    args = parser.parse_args(argv)
    session = signal_study(args.action, args.storage.expanduser())
    print(f"study session {session}: {args.action}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
