"""Figures for the engines, on a lab of its own (2 hosts, gwbridge):

- engine start per lab host: Podman's first command (config written and
  the busybox image imported), dockerd until `docker info` answers;
- from `podman run -d` / `docker run -d` to the new container answering
  ping from a container on the other host (median of N);
- published-port connect time from the lab's outside host (curl's
  time_connect to the host's underlay address, median of N).

Run as root: `python -m overlayd.lab.engine_figures [--runs 10]`. It prints
figures, it asserts nothing about them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

from overlayd.lab.engines import Engine, EngineContainer
from overlayd.lab.lab import Lab, LabSettings
from overlayd.lab.netns import LAB_WAIT_SECONDS, nsenter_argv

SLEEP = ["sleep", "1000000"]


def until_ping(src: EngineContainer, dst: EngineContainer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = subprocess.run(
            nsenter_argv(src.netns_path, "ping", "-n", "-c1", "-W", "0.2", str(dst.address)),
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return
    raise RuntimeError(f"{dst.title} did not answer {src.title}")


def run_to_reachable(engine: Engine, client: EngineContainer, name: str) -> tuple[float, float]:
    """Seconds `run -d` took, and from its start to the first ping answer."""
    started = time.monotonic()
    c = engine.run(name, SLEEP)
    ran = time.monotonic() - started
    until_ping(client, c)
    return ran, time.monotonic() - started


def connect_seconds(lab: Lab, host: int, port: int, *, check: bool = True) -> float | None:
    """curl's connect time from the outside host to the host's published
    `port`; None when it failed (unless `check`, which raises)."""
    out = subprocess.run(
        nsenter_argv(
            lab.outside_ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{time_connect}",
            "--max-time",
            "5",
            f"http://{lab.host_address(host)}:{port}/",
        ),
        capture_output=True,
        text=True,
        check=check,
    )
    return float(out.stdout) if out.returncode == 0 else None


def wait_published(lab: Lab, host: int, port: int, timeout: float = LAB_WAIT_SECONDS) -> None:
    """Until the published port answers from outside (the container's
    server and the engine's port mapping take a moment after `run`)."""
    deadline = time.monotonic() + timeout
    while connect_seconds(lab, host, port, check=False) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"h{host}:{port} did not answer from outside in {timeout:g} s")
        time.sleep(0.1)


def median_ms(values: list[float], digits: int = 0) -> str:
    def ms(x: float) -> str:
        return f"{x * 1000:.{digits}f}"

    return (
        f"median {ms(statistics.median(values))} ms (min {ms(min(values))},"
        f" max {ms(max(values))}, n={len(values)})"
    )


def figures(name: str, runs: int) -> list[str]:
    lab = Lab(name)
    lines = []
    try:
        lab.up(2, settings=LabSettings(containers_per_host=0))
        for host in (1, 2):
            lines.append(f"h{host} podman first command: {lab.podman(host).ensure_started():.2f} s")
            lines.append(f"h{host} dockerd until docker info: {lab.docker(host).start():.2f} s")
        podman_client = lab.podman(1).run("pclient", SLEEP)
        docker_client = lab.docker(2).run("dclient", SLEEP)
        for label, engine, client in (
            ("podman run -d on h2", lab.podman(2), podman_client),
            ("docker run -d on h1", lab.docker(1), docker_client),
        ):
            ran, reach = [], []
            for i in range(runs):
                r, t = run_to_reachable(engine, client, f"fig{i}")
                ran.append(r)
                reach.append(t)
                engine.remove(f"fig{i}")
            lines.append(f"{label}: the command {median_ms(ran)}")
            lines.append(f"{label}: to answering ping from {client.title} {median_ms(reach)}")
        lab.podman(2).run("pweb", ["httpd", "-f", "-p", "80", "-h", "/www"], publish=["8080:80"])
        lab.docker(1).run("dweb", ["httpd", "-f", "-p", "80", "-h", "/www"], publish=["8081:80"])
        # The baseline: a server in the host's own namespace, reached
        # without any DNAT, measured interleaved with the published ports.
        empty = tempfile.mkdtemp(prefix="ovl-fig-")  # it serves nothing, only accepts
        baseline = subprocess.Popen(
            nsenter_argv(lab.host_ns(1), "busybox", "httpd", "-f", "-p", "9000", "-h", empty),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            published = (
                ("host's own server h1:9000 (baseline)", 1, 9000),
                ("podman -p h2:8080", 2, 8080),
                ("docker -p h1:8081", 1, 8081),
            )
            for _, host, port in published:
                wait_published(lab, host, port)
            times: dict[str, list[float]] = {label: [] for label, _, _ in published}
            for _ in range(runs):
                for label, host, port in published:
                    # check=True: a failed connect raises, so every run counts.
                    seconds = connect_seconds(lab, host, port)
                    assert seconds is not None
                    times[label].append(seconds)
            base = statistics.median(times[published[0][0]])
            for label, _, _ in published:
                ratio = statistics.median(times[label]) / base if base else float("nan")
                lines.append(
                    f"{label} connect from outside: {median_ms(times[label], 2)},"
                    f" {ratio:.2f}x the baseline"
                )
        finally:
            baseline.kill()
            baseline.wait()
            os.rmdir(empty)
    finally:
        lab.down()
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--name", default="engfig")
    args = p.parse_args()
    for line in figures(args.name, args.runs):
        print(line, flush=True)


if __name__ == "__main__":
    main()
