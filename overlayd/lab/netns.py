"""Thin, synchronous wrappers around iproute2 for building lab namespaces.

Every command here names a namespace: the lab never adds an address or a
route to the root namespace, and veth pairs are created with both ends
already inside lab namespaces. The `ip netns exec` command line itself is
overlayd.nsexec's, which overlayctl uses too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from overlayd.nsexec import netns_argv

# How long the lab waits for something to come up (etcd healthy, a daemon
# ready or back, a server listening) before it calls it failed. Waits return
# as soon as the thing is there, so only a failure pays for the margin,
# which a loaded 2-vCPU machine needs.
LAB_WAIT_SECONDS = 60.0


class LabCommandError(RuntimeError):
    pass


def sh(argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise LabCommandError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def ip(ns: str, *args: str, check: bool = True) -> str:
    return sh(["ip", "-n", ns, *args], check=check)


class RootNamespaceError(LabCommandError):
    """A command was about to run in the root network namespace."""


# The namespaces the lab must never run a command in: the machine's (PID
# 1's) and the caller's own (the root one, whenever the lab runs).
ROOT_NETNS_PATHS = ("/proc/1/ns/net", "/proc/self/ns/net")


def refuse_root_netns(path: str) -> None:
    """Raise RootNamespaceError if the network namespace at `path` is the
    root's. An engine container's namespace is entered by its PID's path
    (/proc/<pid>/ns/net) from an earlier inspect: if the container died and
    its PID went to a process of the root namespace, the lab's pings and
    probes would run there. A path that cannot be read is left to nsenter
    to refuse (it opens it with the same rights). The check and nsenter's
    open are two steps: a PID reused in between is not caught."""
    try:
        target = os.stat(path)
    except OSError:
        return
    for root in ROOT_NETNS_PATHS:
        try:
            found = os.stat(root)
        except OSError:
            # PID 1's may be closed to us (in a container without
            # CAP_SYS_PTRACE); our own is always there.
            continue
        if (target.st_dev, target.st_ino) == (found.st_dev, found.st_ino):
            raise RootNamespaceError(
                f"{path} is the root network namespace (that of {root}):"
                " the lab runs nothing there (did the container it named exit?)"
            )


def nsenter_argv(net: str, *argv: str, mount: str | None = None) -> list[str]:
    """`argv` in a network namespace only, entered with nsenter: a lab
    namespace by name (/run/netns/<name>) or any by path (a real engine's
    container, /proc/<pid>/ns/net, has no name). The mount namespace, /sys
    included, stays the caller's unless `mount` names one. Refuses the root
    network namespace (refuse_root_netns), before anything runs."""
    path = net if net.startswith("/") else f"/run/netns/{net}"
    refuse_root_netns(path)
    mount_flag = [f"--mount={mount}"] if mount is not None else []
    return ["nsenter", f"--net={path}", *mount_flag, *argv]


def enter_argv(ns: str, *argv: str) -> list[str]:
    """`argv` in a lab namespace by name (`ip netns exec`), or in a network
    namespace by path (nsenter_argv: only the network namespace is entered)."""
    if ns.startswith("/"):
        return nsenter_argv(ns, *argv)
    return netns_argv(ns, *argv)


def proc_cmdline(pid: int) -> list[str]:
    """The command line of process `pid`, [] once it is gone (or a kernel thread)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def in_ns(ns: str, *argv: str, check: bool = True, timeout: float = 30) -> str:
    return sh(enter_argv(ns, *argv), check=check, timeout=timeout)


def module_argv(ns: str, module: str, *args: str) -> list[str]:
    """The command line that runs one of overlayd's modules in `ns` (see
    enter_argv), with the interpreter (and so the venv) the caller runs under."""
    return enter_argv(ns, sys.executable, "-m", module, *args)


def list_namespaces() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add_namespace(ns: str) -> None:
    sh(["ip", "netns", "add", ns])
    ip(ns, "link", "set", "lo", "up")


def veth(ns_a: str, name_a: str, ns_b: str, name_b: str, *, mtu: int | None = None) -> None:
    """A veth pair whose ends are created directly in two lab namespaces,
    both with `mtu` when given (`ip link add` applies an mtu before `peer`
    to the first end only: the peer must be given its own)."""
    extra = ["mtu", str(mtu)] if mtu else []
    ip(
        ns_a,
        "link",
        "add",
        name_a,
        *extra,
        "type",
        "veth",
        "peer",
        "name",
        name_b,
        *extra,
        "netns",
        ns_b,
    )


def host_side_veth(container_ns: str, ifname: str = "eth0") -> str:
    """The name of the other end of a container's veth, in its host."""
    link = json.loads(ip(container_ns, "-j", "link", "show", "dev", ifname))[0]
    peer_index = link["link_index"]
    # Lab container namespaces are named <host namespace>c<index>.
    host_ns = container_ns.rsplit("c", 1)[0]
    for candidate in json.loads(ip(host_ns, "-j", "link", "show")):
        if candidate["ifindex"] == peer_index:
            return str(candidate["ifname"])
    raise LabCommandError(f"no veth peer of {container_ns}/{ifname} in {host_ns}")


def pids_in(ns: str) -> list[int]:
    out = sh(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in out.split() if x.isdigit()]


def kill_namespace_processes(
    ns: str, *, sig: signal.Signals = signal.SIGTERM, grace: float = 10.0
) -> None:
    """Signal everything running in the namespace (SIGTERM by default) and
    wait for it to go; SIGKILL what is still there after the grace time."""
    kill_processes(lambda: pids_in(ns), sig=sig, grace=grace)


def kill_processes(
    find: Callable[[], list[int]], *, sig: signal.Signals = signal.SIGTERM, grace: float = 10.0
) -> None:
    """Signal the processes `find` lists and wait until it lists none;
    SIGKILL what is still there after the grace time."""
    pids = find()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = find()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# `ip netns exec NS` bind-mounts each file of /etc/netns/NS over the one of
# the same name in /etc, for the command it runs: a lab container's own
# resolv.conf lives there.
NETNS_ETC = Path("/etc/netns")


def netns_etc(ns: str) -> Path:
    """The namespace's own /etc files' directory (iproute2's convention)."""
    if not ns or "/" in ns or ns in (".", ".."):
        raise LabCommandError(f"{ns!r} is not a namespace name")
    return NETNS_ETC / ns


def write_resolv_conf(ns: str, text: str) -> None:
    """The resolv.conf that commands run in `ns` with `ip netns exec` see."""
    directory = netns_etc(ns)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "resolv.conf").write_text(text)


def delete_namespace(ns: str) -> None:
    kill_namespace_processes(ns)
    sh(["ip", "netns", "delete", ns], check=False)
    if not ns.startswith("/"):
        # Its own /etc files go with it (ip netns delete leaves them).
        shutil.rmtree(netns_etc(ns), ignore_errors=True)


def reap_children() -> None:
    """Collect exit statuses of children we started and have since killed, so
    that a long-lived driver (a test session) leaves no zombies behind."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
