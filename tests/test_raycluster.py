"""featurestore.raycluster.ensure_ray: the local instance it starts listens on loopback only, dashboard included."""
import ipaddress
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Runs in a fresh interpreter: Ray reads its node-address switch once per process, and this test session may
# already run a Ray of its own. It waits until every port the node advertises is listening (agents come up
# after ray.init returns), then lists what the instance's processes listen on, as /proc shows it.
PROBE = r'''
import json, os, time
from pathlib import Path

from featurestore.raycluster import ensure_ray

ensure_ray()
import ray

def descendants(root):
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            pass
    found, todo = {root}, [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        todo += children
    return found

def listening(pids):
    """(hex address, port) of every listening TCP socket the processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # a process that just exited
            pass
    sockets = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                sockets.append((address, int(port, 16)))
    return sockets

node = ray.nodes()[0]
advertised = {node[key] for key in ("NodeManagerPort", "ObjectManagerPort", "MetricsExportPort", "MetricsAgentPort",
                                    "DashboardAgentListenPort", "RuntimeEnvAgentPort") if node[key] > 0}  # -1: taken
advertised.add(int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]))
advertised.add(int(ray._private.worker.get_dashboard_url().rsplit(":", 1)[1]))
deadline = time.monotonic() + 120  # only a guard: the loop ends when every advertised port listens
while True:
    sockets = listening(descendants(os.getpid()))
    if advertised <= {port for _, port in sockets} or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print(json.dumps({"node_ip": node["NodeManagerAddress"], "advertised": sorted(advertised), "sockets": sockets}))
ray.shutdown()
'''


def ip_from_proc(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp{,6} print addresses as 32-bit words in host (little-endian) byte order."""
    raw = b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, len(hex_address), 8))
    ip = ipaddress.ip_address(raw)
    return getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1


def test_ip_from_proc_reads_both_tables():
    assert str(ip_from_proc("0100007F")) == "127.0.0.1" and str(ip_from_proc("00000000")) == "0.0.0.0"
    assert str(ip_from_proc("0000000000000000FFFF00000100007F")) == "127.0.0.1"
    assert str(ip_from_proc("00000000000000000000000001000000")) == "::1"
    assert str(ip_from_proc("00000000000000000000000000000000")) == "::"


@pytest.mark.e2e
def test_a_local_instance_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    sockets = [(ip_from_proc(address), port) for address, port in report["sockets"]]
    assert report["node_ip"] == "127.0.0.1"
    assert set(report["advertised"]) <= {port for _, port in sockets}, f"advertised ports not listening: {report}"
    exposed = [f"{ip}:{port}" for ip, port in sockets if not ip.is_loopback]
    assert not exposed, f"Ray services listening beyond loopback: {exposed}"
