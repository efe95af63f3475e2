"""What engine teardown works with, all from what is on disk: the engine
processes under a state dir (ENGINE_PROGRAMS, nothing else), the mounts
under it, runc's own state, the dirs the lab made in the root mount
namespace (PLUGIN_SOCKETS), and Podman's /run/netns entries; and
sweep_state_dir, the fallback when an engine's own teardown fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from overlayd.lab.engines.common import NETNS_RECORD, run_command
from overlayd.lab.netns import proc_cmdline

# The programs an engine runs (by argv[0]'s base name), the only processes
# teardown may stop: a user's `tail -f <state dir>/dockerd.log` or an
# editor on a file there mentions the dir too, and is none of ours.
ENGINE_PROGRAMS = frozenset(
    {
        "dockerd",
        "containerd",
        "conmon",
        "podman",
        "runc",
        "catatonit",
        "docker-init",
        "docker-proxy",
    }
)


def is_engine_program(argv0: str) -> bool:
    """Whether argv[0] names one of an engine's programs (containerd-shim*
    counts: containerd-shim-runc-v2 and its kin)."""
    name = Path(argv0).name
    return name in ENGINE_PROGRAMS or name.startswith("containerd-shim")


def processes_mentioning(directory: str) -> list[int]:
    """Engine processes (is_engine_program) whose command line names
    `directory` or a path under it (an engine's state dir: dockerd,
    containerd, its shims and conmon all name it). Not a mere prefix:
    <host>/docker-plugins is not <host>/docker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        argv = proc_cmdline(int(entry.name))
        if not argv or not is_engine_program(argv[0]):
            continue
        if any(names_path_under(part, directory) for part in argv[1:]):
            found.append(int(entry.name))
    return found


def names_path_under(arg: str, directory: str) -> bool:
    """Whether a command-line argument is `directory` or names a path under
    it, alone or as an option's value (`--root=/d/x`, `unix:///d/sock`)."""
    directory = directory.rstrip("/")
    return arg.endswith(directory) or f"{directory}/" in arg


def stop_processes(pids: Iterable[int], grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL what is still there after `grace` seconds."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and not is_zombie(p)]
        if not pids:
            return
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory` in our mount namespace, deepest first."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = _mount_target(line)
        if target == str(directory) or target.startswith(f"{directory}/"):
            found.append(target)
    return sorted(set(found), key=lambda t: (-t.count("/"), t))


def unmount_under(directory: Path) -> None:
    for target in mounts_under(directory):
        run_command(["umount", "-l", target], check=False)


def sweep_runc(root: Path) -> None:
    """Kill and delete every container runc still knows under `root` (its
    state dir): the fallback when the engine that made them is gone."""
    if not root.is_dir():
        return
    out = run_command(["runc", "--root", str(root), "list", "-q"], check=False)
    for cid in out.split():
        run_command(["runc", "--root", str(root), "delete", "--force", cid], check=False)


def sweep_state_dir(directory: Path) -> list[str]:
    """The fallback when an engine's own teardown failed (its command line
    broke, timed out, or its state is damaged): runc's containers under the
    dir killed (Podman's and dockerd's runc roots), its engine processes
    stopped, its mounts unmounted, Podman's recorded /run/netns entries
    removed. Each step is tried whatever the one before did; what failed is
    returned."""
    steps: list[tuple[str, Callable[[], None]]] = [
        ("runc", lambda: sweep_runc(directory / "runc")),
        ("runc", lambda: sweep_runc(directory / "exec" / "runtime-runc" / "moby")),
        ("processes", lambda: stop_processes(processes_mentioning(str(directory)))),
        ("mounts", lambda: unmount_under(directory)),
        ("netns", lambda: remove_netns_entries(_recorded_netns(directory))),
    ]
    failed = []
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # the sweep is the last resort: it goes on
            failed.append(f"{what}: {exc}")
    return failed


def _recorded_netns(directory: Path) -> list[str]:
    try:
        return (directory / NETNS_RECORD).read_text().split()
    except FileNotFoundError:
        return []


# dockerd finds a network plugin by its socket in /run/docker/plugins. Each
# host's dockerd sees its own plugin dir there (Docker.ensure_mount_ns), so
# that path must exist in the root mount namespace to be bound over. The lab
# makes it only when it is missing, records what it made under the state
# root, and removes that once no dockerd mount namespace uses it.
PLUGIN_SOCKETS = Path("/run/docker/plugins")
MADE_RECORD = "made-dirs"


def make_missing_dirs(path: Path, record: Path) -> None:
    """`path` and its missing parents made; each dir made here is appended
    to `record` (so only what the lab made is ever removed)."""
    missing = [d for d in (path, *path.parents) if not d.exists()]
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue  # another lab made it at the same moment and records it
        record.parent.mkdir(parents=True, exist_ok=True)
        with record.open("a") as f:
            f.write(f"{d}\n")


def remove_made_dirs(record: Path, in_use: Callable[[], bool]) -> None:
    """The dirs `record` lists removed, deepest first, unless in_use() says
    a mount namespace still has something mounted on them (removing a
    mount point detaches the mounts on it in every other namespace). Only
    empty dirs go: one someone else filled stays."""
    if not record.exists() or in_use():
        return
    for line in sorted(set(record.read_text().split()), key=lambda d: -d.count("/")):
        with contextlib.suppress(OSError):
            os.rmdir(line)
    record.unlink(missing_ok=True)


def plugin_sockets_in_use(mount_point: Path = PLUGIN_SOCKETS) -> bool:
    """Whether any dockerd mount namespace may still use `mount_point`: a
    host's kept namespace (its ns file bound at <host>/docker/mntns, seen
    in our mount table) or a running dockerd with a mount on it."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if _mount_target(line).endswith("/docker/mntns"):
            return True
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or Path(proc_cmdline_argv0(int(entry.name))).name != "dockerd":
            continue
        try:
            table = (entry / "mountinfo").read_text()
        except OSError:
            continue
        if any(_mount_target(line) == str(mount_point) for line in table.splitlines()):
            return True
    return False


def proc_cmdline_argv0(pid: int) -> str:
    return (proc_cmdline(pid) or [""])[0]


def _mount_target(mountinfo_line: str) -> str:
    # The mount point is field 5, with spaces etc. octal-escaped.
    return mountinfo_line.split()[4].encode().decode("unicode_escape")


def remove_netns_entries(paths: Iterable[str]) -> None:
    """Podman's /run/netns/netns-* entries (only ever ones its containers named)."""
    for path in paths:
        if path.startswith("/run/netns/") and os.path.lexists(path):
            run_command(["umount", path], check=False)
            with contextlib.suppress(OSError):
                os.unlink(path)
