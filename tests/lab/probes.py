"""What several lab test modules ask of a lab host: its daemon's HTTP
endpoints, a daemon run once to see how it starts (or refuses to), and a
100/s ping between containers to count lost packets."""

from __future__ import annotations

import re
import subprocess
import sys
from ipaddress import IPv4Address

from overlayd.lab import netns
from overlayd.lab.engines import EngineContainer
from overlayd.lab.lab import Lab
from tests.conftest import CONVERGE


def http_get(lab: Lab, host: int, path: str) -> tuple[int, str]:
    """Status and body of `path` on the host's metrics address."""
    script = (
        "import urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://127.0.0.1:9469{path}', timeout=30)\n"
        "    print(r.status); print(r.read().decode(), end='')\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode(), end='')\n"
    )
    out = netns.in_ns(lab.host_ns(host), sys.executable, "-c", script)
    code, _, body = out.partition("\n")
    return int(code), body


def run_daemon_once(
    lab: Lab, *args: str, bridge: str = "badbr"
) -> subprocess.CompletedProcess[str]:
    """overlayd in h1's namespace with the lab's etcd (and h1's certificate)
    and underlay, to the end; `args` come last, so they override (an empty
    value drops a setting)."""
    return subprocess.run(
        netns.module_argv(
            lab.host_ns(1),
            "overlayd.cli.daemon",
            *lab.etcd_flags(1),
            "--iface",
            "eth0",
            "--bridge",
            bridge,
            "--subnet-file",
            "/nonexistent/subnet.env",
            "--control-socket",
            str(lab.state_dir / "once.sock"),
            "--metrics-address",
            "off",
            *args,
        ),
        capture_output=True,
        text=True,
        timeout=CONVERGE,
    )


def ping_flood(src: EngineContainer, dst: IPv4Address, seconds: float) -> subprocess.Popen[str]:
    """iputils ping at 100/s inside the container's network namespace."""
    count = int(seconds * 100)
    return subprocess.Popen(
        [
            "nsenter",
            f"--net={src.netns_path}",
            "ping",
            "-n",
            "-q",
            "-i",
            "0.01",
            "-c",
            str(count),
            "-W",
            "1",
            str(dst),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def sent_received(out: str) -> tuple[int, int]:
    found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert found, out
    return int(found.group(1)), int(found.group(2))
