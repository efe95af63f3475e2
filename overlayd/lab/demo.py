"""`overlayctl lab demo`: the cross-engine demo. A web server in a real
Podman container on h2 answers a real client in a Docker container on h1
(dockerd on overlayd's bridge with the `docker-opts` flags), across the
overlay. The containers stay up for the user to look at; `lab down`
removes them with the lab.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from overlayd.lab.lab import Lab

PAGE = "hello from a Podman container on h2"
WEB, CLIENT = "demo-web", "demo-client"


@dataclass(frozen=True, slots=True)
class DemoResult:
    ok: bool
    lines: list[str]


def cross_engine_demo(
    lab: Lab, *, server_host: int = 2, client_host: int = 1, timeout: float = 30.0
) -> DemoResult:
    podman, docker = lab.podman(server_host), lab.docker(client_host)
    podman_start, docker_start = podman.ensure_started(), docker.ensure_started()
    # Again from scratch when run twice.
    podman.remove(WEB)
    docker.remove(CLIENT)
    web = podman.run(
        WEB, ["sh", "-c", f"echo '{PAGE}' > /www/index.html && exec httpd -f -p 80 -h /www"]
    )
    client = docker.run(CLIENT, ["sleep", "1000000"])
    url = f"http://{web.address}/"
    lines = [
        f"h{server_host} podman: {web.name} at {web.address}, busybox httpd"
        + (f" (engine ready in {podman_start:.1f} s)" if podman_start else ""),
        f"h{client_host} docker (docker-opts): {client.name} at {client.address}"
        + (f" (dockerd ready in {docker_start:.1f} s)" if docker_start else ""),
    ]
    started = time.monotonic()
    body = None
    while body is None and time.monotonic() - started < timeout:
        body = docker.http_get(CLIENT, url, timeout=3)
        if body is None:
            time.sleep(0.2)
    took = time.monotonic() - started
    if body is not None and PAGE in body:
        lines.append(f"h{client_host}/docker/{CLIENT} GET {url}: {body.strip()!r} ({took:.2f} s)")
        lines.append(
            "the containers stay up: `overlayctl lab check` pings them; `lab down` ends them"
        )
        return DemoResult(True, lines)
    lines.append(f"FAILED: h{client_host}/docker/{CLIENT} GET {url}: {body!r} after {took:.1f} s")
    return DemoResult(False, lines)
