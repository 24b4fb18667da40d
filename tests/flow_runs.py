"""tests/ helper: run the encode flow's command line in a fresh interpreter and tell whether Ray started there."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CODE = """if True:
    import contextlib, io, json, os, sys
    sys.path.insert(0, "flows")
    import encode_items
    out = []
    for argv, changes in json.loads(sys.argv[1]):
        os.environ.update(changes)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            out.append([encode_items.main(argv), stderr.getvalue()])
    import ray
    print(json.dumps({"runs": out, "ray": ray.is_initialized()}))
"""


def encode_flow_runs(argvs: list[list[str]], env: dict | None = None,
                     env_changes: list[dict] | None = None) -> tuple[list[tuple[int, str]], bool]:
    """`flows/encode_items.py main(argv)` for each argv, one after another in one new process (each after its
    `env_changes`, if given, are set in the process's environment): ([(exit status, stderr)], whether Ray was
    initialised in that process afterwards)."""
    runs = list(zip(argvs, env_changes or [{}] * len(argvs)))
    done = subprocess.run([sys.executable, "-c", _CODE, json.dumps(runs)], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    return [tuple(run) for run in result["runs"]], result["ray"]
