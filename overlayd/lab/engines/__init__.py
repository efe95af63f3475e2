"""Real container engines in lab hosts: Podman (CNI backend, overlay-cni
then portmap) and dockerd (on overlayd's bridge with the `docker-opts`
flags, or plain for a network plugin), each with its own state under the
host's directory, and a busybox image built from busybox-static.

    common.py   what both engines share: constants, EngineError, the
                command runner, EngineContainer, parse_inspect,
                parse_publish, the Engine base class
    image.py    the busybox rootfs tarball every engine imports
    podman.py   Podman, its state in <host dir>/podman
    docker.py   dockerd in its own mount namespace, its state in
                <host dir>/docker; docker_opts_flags
    cleanup.py  what teardown works with: engine processes, mounts, runc's
                own state, dirs the lab made, Podman's /run/netns entries

How they run here (see shared FACTS.md, "engines"):
- every engine command enters the host's network namespace with
  `nsenter --net=/run/netns/<host>`, never `ip netns exec`, which remounts
  /sys and leaves runc without a cgroup mount;
- runc with cgroupfs (crun fails on this hybrid cgroup layout), explicit
  ulimits (no process here may raise them), the vfs storage driver (plain
  directories: no overlay mounts to leak);
- Podman's state and locks: podman.py; dockerd's mount namespace and
  plugin discovery: docker.py.

Teardown (`teardown_host`) works from what is on disk, so `lab down` cleans
up engines another process started, or ones left by a crash: containers
removed through the engine, then runc's own state swept, engine processes
(dockerd, containerd, shims, conmon, ...: ENGINE_PROGRAMS, never a user's
`tail` of a log there) stopped, mounts under the host's directory
unmounted, and Podman's /run/netns entries of those containers removed. An
engine whose teardown fails is swept from disk all the same, and the
failure reported after the rest is done.
"""

from __future__ import annotations

from pathlib import Path

from overlayd.lab.engines.cleanup import (
    ENGINE_PROGRAMS,
    MADE_RECORD,
    PLUGIN_SOCKETS,
    is_engine_program,
    make_missing_dirs,
    mounts_under,
    names_path_under,
    plugin_sockets_in_use,
    proc_cmdline_argv0,
    processes_mentioning,
    remove_made_dirs,
    remove_netns_entries,
    stop_processes,
    sweep_runc,
    sweep_state_dir,
    unmount_under,
)
from overlayd.lab.engines.common import (
    DOCKER,
    DOCKER_FLAVOURS,
    ENGINE_KINDS,
    ENGINE_WAIT_SECONDS,
    IMAGE,
    NETNS_RECORD,
    NETWORK,
    ULIMITS,
    Engine,
    EngineContainer,
    EngineError,
    parse_inspect,
    parse_publish,
)
from overlayd.lab.engines.docker import Docker, docker_opts_flags
from overlayd.lab.engines.image import (
    BUSYBOX,
    REQUIRED_APPLETS,
    build_busybox_tarball,
    busybox_applets,
    image_tarball,
)
from overlayd.lab.engines.podman import Podman
from overlayd.lab.hosts import HostFiles

__all__ = [
    "BUSYBOX",
    "DOCKER",
    "DOCKER_FLAVOURS",
    "ENGINE_KINDS",
    "ENGINE_PROGRAMS",
    "ENGINE_WAIT_SECONDS",
    "IMAGE",
    "MADE_RECORD",
    "NETNS_RECORD",
    "NETWORK",
    "PLUGIN_SOCKETS",
    "REQUIRED_APPLETS",
    "ULIMITS",
    "Docker",
    "Engine",
    "EngineContainer",
    "EngineError",
    "Podman",
    "build_busybox_tarball",
    "busybox_applets",
    "docker_opts_flags",
    "engine",
    "image_tarball",
    "is_engine_program",
    "make_missing_dirs",
    "mounts_under",
    "names_path_under",
    "parse_inspect",
    "parse_publish",
    "plugin_sockets_in_use",
    "present",
    "proc_cmdline_argv0",
    "processes_mentioning",
    "remove_made_dirs",
    "remove_netns_entries",
    "stop_processes",
    "sweep_runc",
    "sweep_state_dir",
    "teardown_host",
    "unmount_under",
]


def engine(
    kind: str,
    host: int,
    ns: str,
    files: HostFiles,
    image_tar: Path,
    *,
    flavour: str | None = None,
) -> Engine:
    """The engine of `kind` on a host (not started: see ensure_started)."""
    if kind == "podman":
        return Podman(host, ns, files, image_tar)
    if kind == "docker":
        return Docker(host, ns, files, image_tar, flavour)
    raise EngineError(f"engine {kind!r}: one of {ENGINE_KINDS}")


def present(host: int, ns: str, files: HostFiles, image_tar: Path) -> list[Engine]:
    """The engines that have state on this host (running or not)."""
    return [
        engine(kind, host, ns, files, image_tar)
        for kind in ENGINE_KINDS
        if (files.root / kind).exists()
    ]


def teardown_host(host: int, ns: str, files: HostFiles, image_tar: Path) -> None:
    """Every engine of the host stopped and cleaned (see the module's
    docstring). Each engine is torn down whatever happened to the other;
    one whose teardown fails (its command line broke or timed out, its state
    is damaged) is swept from disk instead (sweep_state_dir), and then the
    failures are raised together as an EngineError."""
    failed = []
    for kind in ENGINE_KINDS:
        state = files.root / kind
        if not state.exists():
            continue
        try:
            found: Engine
            if kind == "podman":
                found = Podman(host, ns, files, image_tar)
            else:
                # Flavour and live-restore do not matter to teardown; given,
                # a damaged engine.json is not read.
                found = Docker(host, ns, files, image_tar, "plain", live_restore=False)
            found.teardown()
        except Exception as exc:  # teardown goes on: the sweep, the next engine
            swept = sweep_state_dir(state)
            failed.append(f"{kind}: {exc}" + (f" (sweep: {'; '.join(swept)})" if swept else ""))
    if failed:
        raise EngineError(f"h{host}'s engines: " + " | ".join(failed))
