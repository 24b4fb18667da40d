"""What every flow's command line shares: run the job, print its lines, and turn a user error into one line.

Kept free of torch so that a flow which needs no model (encoding) does not load it in its driver.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def run_job(job: Callable[[], Any]) -> int:
    """A flow's exit status: run `job` and print its result's lines (0, or the result's own exit_status: an
    interrupted sweep's), or one line for a user error (2): bad settings, a bad space or an unusable store,
    found before anything trained."""
    from featurestore.store import StoreError

    try:
        result = job()
    except (ValueError, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(result.lines()))
    return getattr(result, "exit_status", 0)
