"""Real container engines in lab hosts: Podman (CNI backend, overlay-cni
then portmap) and dockerd (on overlayd's bridge with the `docker-opts`
flags, or plain for a network plugin), each with its own state under the
host's directory, and a busybox image built from busybox-static.

How they run here (see shared FACTS.md, "engines"):
- every engine command enters the host's network namespace with
  `nsenter --net=/run/netns/<host>`, never `ip netns exec`, which remounts
  /sys and leaves runc without a cgroup mount;
- runc with cgroupfs (crun fails on this hybrid cgroup layout), explicit
  ulimits (no process here may raise them), the vfs storage driver (plain
  directories: no overlay mounts to leak);
- Podman's state (root, runroot, tmp dir, locks, runc's state, CNI config)
  lives in <host dir>/podman; `lock_type = "file"` because the default
  shared-memory locks are one segment for every Podman on the machine, and a
  fresh runroot frees all of them;
- dockerd runs in the host's network namespace AND a private mount
  namespace of its own, with <host dir>/docker-plugins bound over
  /run/docker/plugins (and /etc/docker/plugins), so each dockerd discovers
  only its own host's network plugin; its state is in <host dir>/docker.
  /run/docker/plugins must exist in the root mount namespace to be bound
  over: the lab makes it only if missing, and removes what it made once no
  dockerd mount namespace is left (PLUGIN_SOCKETS).
  That mount namespace is made once per host and kept (its ns file bound at
  <host dir>/docker/mntns), and every dockerd of the host enters it: dockerd
  keeps its containers' network namespaces as bind mounts under its
  exec-root, and a restarted dockerd with --live-restore must find them (in
  a fresh namespace they are empty files, setns fails with EINVAL, and
  libnetwork deletes the live containers' endpoints as stale).

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

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, ClassVar

from overlayd.lab.hosts import HostFiles
from overlayd.lab.netns import LabCommandError, nsenter_argv, proc_cmdline

IMAGE = "localhost/overlayd-busybox"
BUSYBOX = Path("/usr/bin/busybox")  # Debian's busybox-static
# What the lab's containers run; the image build fails without them.
REQUIRED_APPLETS = ("sh", "httpd", "wget", "ping", "nc", "sleep", "timeout", "ip", "cat")
ULIMITS = ("nofile=1024:1024", "nproc=1024:1024")
DOCKER = "/usr/bin/docker"  # /usr/local/bin/docker may be an unrelated client
DOCKER_FLAVOURS = ("docker-opts", "plain")
ENGINE_KINDS = ("podman", "docker")
NETWORK = "overlay"  # the CNI network (conflist) name Podman's containers join
ENGINE_WAIT_SECONDS = 60.0
NETNS_RECORD = "netns-entries"  # Podman's /run/netns entries, under its state dir


class EngineError(LabCommandError):
    pass


def _run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 120,
    stdin: bytes | None = None,
) -> str:
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        input=stdin,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
        # Engines leave relative paths alone, but a cwd inside a state dir
        # that is being removed would break them.
        cwd="/",
    )
    out = proc.stdout.decode(errors="replace")
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip() or out.strip()
        raise EngineError(f"{shlex.join(argv)}: exit {proc.returncode}: {err}")
    return out


# --- the image ------------------------------------------------------------------


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    return _run([str(busybox), "--list"]).split()


def build_busybox_tarball(target: Path, busybox: Path = BUSYBOX) -> Path:
    """A rootfs tarball: /bin/busybox, a link per applet, /etc/passwd and
    /etc/group for root, /tmp, and /www/index.html for httpd. Written to a
    temporary name and renamed, so concurrent builders never see half a file."""
    if target.exists():
        return target
    applets = busybox_applets(busybox)
    missing = [a for a in REQUIRED_APPLETS if a not in applets]
    if missing:
        raise EngineError(f"{busybox} lacks applets {missing}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tar.tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:

            def add_dir(name: str, mode: int = 0o755) -> None:
                info = tarfile.TarInfo(name)
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)

            def add_text(name: str, text: str) -> None:
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, _BytesReader(data))

            for d in ("bin", "etc", "proc", "sys", "dev", "root", "www", "var"):
                add_dir(d)
            add_dir("tmp", 0o1777)
            tar.add(str(busybox), "bin/busybox")
            for applet in applets:
                if applet != "busybox":
                    link = tarfile.TarInfo(f"bin/{applet}")
                    link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                    tar.addfile(link)
            add_text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
            add_text("etc/group", "root:x:0:\n")
            add_text("www/index.html", "overlayd-busybox\n")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


class _BytesReader:
    """The file object tarfile.addfile reads a member's data from."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._pos + size
        chunk = self._data[self._pos : end]
        self._pos += len(chunk)
        return chunk


def image_tarball(state_root: Path) -> Path:
    """The busybox rootfs, built once per machine boot under the lab's state
    root (a tmpfs), shared by every lab and engine."""
    return build_busybox_tarball(state_root / "images" / "overlayd-busybox.tar")


# --- containers -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineContainer:
    """A running engine container, as the engine reports it."""

    engine: str
    host: int
    name: str
    id: str
    pid: int
    # address per network name, as the engine reports them
    addresses: dict[str, IPv4Address] = field(default_factory=dict)

    @property
    def address(self) -> IPv4Address | None:
        """The overlay address: the CNI network's for Podman, else the first."""
        if NETWORK in self.addresses:
            return self.addresses[NETWORK]
        return next(iter(self.addresses.values()), None)

    @property
    def netns_path(self) -> str:
        """The container's network namespace, for `nsenter --net=`."""
        return f"/proc/{self.pid}/ns/net"

    @property
    def title(self) -> str:
        return f"h{self.host}/{self.engine}/{self.name}"


def parse_inspect(engine: str, host: int, raw: Mapping[str, Any]) -> EngineContainer:
    """One container from `podman inspect` / `docker inspect` JSON."""
    networks = (raw.get("NetworkSettings") or {}).get("Networks") or {}
    addresses = {
        name: IPv4Address(info["IPAddress"])
        for name, info in sorted(networks.items())
        if info and info.get("IPAddress")
    }
    return EngineContainer(
        engine=engine,
        host=host,
        name=str(raw.get("Name", "")).lstrip("/"),
        id=str(raw["Id"]),
        pid=int((raw.get("State") or {}).get("Pid") or 0),
        addresses=addresses,
    )


def parse_publish(spec: str) -> tuple[int, int]:
    """`-p HOST:CONTAINER` (TCP) as two ports; anything else is refused."""
    host, sep, container = spec.partition(":")
    if not sep or not host.isdigit() or not container.isdigit():
        raise EngineError(f"-p {spec!r}: give HOSTPORT:CONTAINERPORT")
    ports = int(host), int(container)
    if not all(0 < p < 65536 for p in ports):
        raise EngineError(f"-p {spec!r}: ports are 1..65535")
    return ports


# --- processes and mounts --------------------------------------------------------------


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
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
        if not pids:
            return
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
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
        _run(["umount", "-l", target], check=False)


def sweep_runc(root: Path) -> None:
    """Kill and delete every container runc still knows under `root` (its
    state dir): the fallback when the engine that made them is gone."""
    if not root.is_dir():
        return
    out = _run(["runc", "--root", str(root), "list", "-q"], check=False)
    for cid in out.split():
        _run(["runc", "--root", str(root), "delete", "--force", cid], check=False)


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
            _run(["umount", path], check=False)
            with contextlib.suppress(OSError):
                os.unlink(path)


# --- engines ---------------------------------------------------------------------


class Engine:
    """What both engines offer; `host`, `ns` and `files` name the lab host."""

    kind: ClassVar[str]

    def __init__(self, host: int, ns: str, files: HostFiles, image_tar: Path) -> None:
        self.host, self.ns, self.files, self.image_tar = host, ns, files, image_tar
        self.dir = files.root / self.kind

    # subclasses --------------------------------------------------------------
    def argv(self, *args: str) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    def start(self) -> float:
        raise NotImplementedError

    def running(self) -> bool:
        raise NotImplementedError

    def teardown(self) -> None:
        raise NotImplementedError

    # shared ------------------------------------------------------------------
    def cli(
        self, *args: str, check: bool = True, timeout: float = 120, stdin: bytes | None = None
    ) -> str:
        """The engine's command line with this host's state, its output."""
        return _run(self.argv(*args), env=self.env(), check=check, timeout=timeout, stdin=stdin)

    def ensure_started(self) -> float:
        """Start the engine unless it runs; the seconds that took (0 if it ran)."""
        return 0.0 if self.running() else self.start()

    def run_args(self, publish: Sequence[str]) -> list[str]:
        args = []
        for spec in publish:
            parse_publish(spec)
            args += ["-p", spec]
        return args

    def run(
        self,
        name: str | None,
        command: Sequence[str],
        *,
        publish: Sequence[str] = (),
        extra: Sequence[str] = (),
    ) -> EngineContainer:
        """A detached container of the busybox image running `command`
        (named by the engine when `name` is None)."""
        self.ensure_started()
        naming = ["--name", name] if name else []
        out = self.cli("run", "-d", *naming, *self.run_args(publish), *extra, IMAGE, *command)
        return self.inspect(name or out.strip().splitlines()[-1])

    def inspect(self, name: str) -> EngineContainer:
        raw = json.loads(self.cli("inspect", "--type", "container", name))
        return parse_inspect(self.kind, self.host, raw[0])

    def containers(self) -> list[EngineContainer]:
        """The running containers (none when the engine is not running)."""
        if not self.running():
            return []
        ids = self.cli("ps", "-q", "--no-trunc", check=False).split()
        if not ids:
            return []
        raw = json.loads(self.cli("inspect", "--type", "container", *ids, check=False) or "[]")
        return [parse_inspect(self.kind, self.host, r) for r in raw]

    def exec(self, name: str, *argv: str, check: bool = True, timeout: float = 60) -> str:
        return self.cli("exec", name, *argv, check=check, timeout=timeout)

    def remove(self, name: str) -> None:
        self.cli("rm", "-f", *self.rm_flags, name, check=False)

    # Podman's `rm -f` stops with SIGTERM and waits 10 s (a shell or sleep
    # as PID 1 ignores it); Docker's kills at once.
    rm_flags: ClassVar[tuple[str, ...]] = ()

    def http_get(self, name: str, url: str, *, timeout: int = 5) -> str | None:
        """The body `url` gives a client in container `name`; None if it fails.
        (busybox-static 1.35's `wget -T` segfaults: the applet `timeout` bounds it.)"""
        out = subprocess.run(
            self.argv("exec", name, "timeout", str(timeout), "wget", "-qO-", url),
            capture_output=True,
            env={**os.environ, **self.env()},
            timeout=timeout + 60,
            check=False,
        )
        return out.stdout.decode(errors="replace") if out.returncode == 0 else None


class Podman(Engine):
    """Podman on one lab host: no daemon; "started" means configured and the
    image imported (the first command is what a user waits for)."""

    kind = "podman"
    rm_flags = ("--time", "0")

    def __init__(
        self,
        host: int,
        ns: str,
        files: HostFiles,
        image_tar: Path,
        *,
        dns: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(host, ns, files, image_tar)
        # The network config's `dns` (CNI's DNS type), written at start:
        # overlay-cni passes it into its result, Podman writes resolv.conf.
        self.dns = dns

    @property
    def conf(self) -> Path:
        return self.dir / "containers.conf"

    @property
    def network_dir(self) -> Path:
        return self.dir / "networks"

    @property
    def runc_root(self) -> Path:
        return self.dir / "runc"

    @property
    def netns_record(self) -> Path:
        """The /run/netns entries of this Podman's containers, kept for teardown."""
        return self.dir / NETNS_RECORD

    def argv(self, *args: str) -> list[str]:
        return nsenter_argv(
            self.ns,
            "podman",
            "--root",
            str(self.dir / "root"),
            "--runroot",
            str(self.dir / "runroot"),
            "--storage-driver",
            "vfs",
            "--network-config-dir",
            str(self.network_dir),
            "--runtime-flag",
            f"root={self.runc_root}",
            *args,
        )

    def env(self) -> dict[str, str]:
        return {"CONTAINERS_CONF": str(self.conf)}

    def conflist(self) -> dict[str, Any]:
        from overlayd.lab.containers import cni_config

        overlay = cni_config(self.files)
        if self.dns is not None:
            overlay["dns"] = dict(self.dns)
        return {
            "cniVersion": overlay.pop("cniVersion"),
            "name": overlay.pop("name"),
            "plugins": [overlay, {"type": "portmap", "capabilities": {"portMappings": True}}],
        }

    def containers_conf(self) -> str:
        plugin_dirs = [str(Path(sys.executable).parent), "/usr/lib/cni"]
        return "\n".join(
            [
                "[containers]",
                f"default_ulimits = {json.dumps(list(ULIMITS))}",
                # catatonit as PID 1, for the same reason as dockerd's --init.
                "init = true",
                "[network]",
                'network_backend = "cni"',
                f"cni_plugin_dirs = {json.dumps(plugin_dirs)}",
                f'default_network = "{NETWORK}"',
                f"network_config_dir = {json.dumps(str(self.network_dir))}",
                "[engine]",
                'cgroup_manager = "cgroupfs"',
                'runtime = "runc"',
                'lock_type = "file"',
                'events_logger = "file"',
                f"events_logfile_path = {json.dumps(str(self.dir / 'events.log'))}",
                f"tmp_dir = {json.dumps(str(self.dir / 'tmp'))}",
                "",
            ]
        )

    def running(self) -> bool:
        return (self.dir / "started").exists()

    def start(self) -> float:
        started = time.monotonic()
        self.network_dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.containers_conf())
        (self.network_dir / f"{NETWORK}.conflist").write_text(json.dumps(self.conflist()))
        self.cli("import", str(self.image_tar), IMAGE)
        (self.dir / "started").touch()
        return time.monotonic() - started

    def run(
        self,
        name: str | None,
        command: Sequence[str],
        *,
        publish: Sequence[str] = (),
        extra: Sequence[str] = (),
    ) -> EngineContainer:
        found = super().run(name, command, publish=publish, extra=extra)
        key = self.cli("inspect", "--format", "{{.NetworkSettings.SandboxKey}}", found.id).strip()
        if key:
            with self.netns_record.open("a") as f:
                f.write(key + "\n")
        return found

    def teardown(self) -> None:
        if not self.dir.exists():
            return
        record = self.netns_record
        entries = set(record.read_text().split()) if record.exists() else set()
        if self.conf.exists():
            # Also the entries of containers made with podman directly, not `run`.
            ids = self.cli("ps", "-aq", "--no-trunc", check=False).split()
            if ids:
                keys = self.cli(
                    "inspect", "--format", "{{.NetworkSettings.SandboxKey}}", *ids, check=False
                )
                entries |= set(keys.split())
            self.cli("rm", "--all", "--force", "--time", "0", check=False, timeout=120)
        sweep_runc(self.runc_root)
        stop_processes(processes_mentioning(str(self.dir)))
        unmount_under(self.dir)
        remove_netns_entries(entries)
        self.netns_record.unlink(missing_ok=True)
        (self.dir / "started").unlink(missing_ok=True)


class Docker(Engine):
    """dockerd on one lab host, in the host's network namespace and a mount
    namespace of its own (see the module's docstring)."""

    kind = "docker"

    def __init__(
        self,
        host: int,
        ns: str,
        files: HostFiles,
        image_tar: Path,
        flavour: str | None = None,
        *,
        live_restore: bool | None = None,
    ) -> None:
        super().__init__(host, ns, files, image_tar)
        # engine.json is read only for what the caller left open (teardown
        # gives both: a damaged file must not stop it).
        saved = self._saved() if flavour is None or live_restore is None else {}
        self.flavour = flavour or str(saved.get("flavour", "docker-opts"))
        if self.flavour not in DOCKER_FLAVOURS:
            raise EngineError(f"docker flavour {self.flavour!r}: one of {DOCKER_FLAVOURS}")
        self.live_restore = (
            live_restore if live_restore is not None else bool(saved.get("live_restore", False))
        )

    @property
    def socket(self) -> Path:
        return self.dir / "docker.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "docker.pid"

    @property
    def log(self) -> Path:
        return self.dir / "dockerd.log"

    @property
    def made_record(self) -> Path:
        """What the lab made in the root mount namespace (PLUGIN_SOCKETS),
        recorded under the state root (<root>/<lab>/h<N> is the host's dir)."""
        return self.files.root.parent.parent / MADE_RECORD

    @property
    def plugin_dir(self) -> Path:
        """This host's Docker plugin sockets; dockerd sees it as /run/docker/plugins."""
        return self.files.root / "docker-plugins"

    def _saved(self) -> dict[str, Any]:
        try:
            found: dict[str, Any] = json.loads((self.dir / "engine.json").read_text())
        except FileNotFoundError:
            return {}
        return found

    def argv(self, *args: str) -> list[str]:
        # The client needs no namespace: it only talks to the socket.
        return [DOCKER, "-H", f"unix://{self.socket}", *args]

    def bridge_flags(self) -> list[str]:
        """docker-opts: the flags `overlayctl docker-opts` derives from the
        host's subnet file (asked of the real command, so the lab runs what
        users run); plain: no bridge at all, containers join a plugin network."""
        if self.flavour == "plain":
            return ["--bridge=none"]
        out = _run(
            [
                sys.executable,
                "-m",
                "overlayd.cli.ctl",
                "docker-opts",
                "--subnet-file",
                str(self.files.subnet_file),
                "--out",
                "-",
            ]
        )
        return docker_opts_flags(out)

    def dockerd_argv(self) -> list[str]:
        flags = [
            "--config-file",
            str(self.dir / "daemon.json"),
            "--data-root",
            str(self.dir / "data"),
            "--exec-root",
            str(self.dir / "exec"),
            "--pidfile",
            str(self.pidfile),
            "-H",
            f"unix://{self.socket}",
            "--storage-driver",
            "vfs",
            *[part for u in ULIMITS for part in ("--default-ulimit", u)],
            # An init (docker-init) as every container's PID 1: busybox's
            # sh, sleep or httpd as PID 1 ignore SIGTERM, so each stop (and
            # each dockerd restart) would wait out Docker's 10 s.
            "--init",
            *self.bridge_flags(),
        ]
        if self.live_restore:
            flags.append("--live-restore")
        return nsenter_argv(self.ns, "dockerd", *flags, mount=str(self.mount_ns))

    @property
    def mount_ns(self) -> Path:
        """The ns file of this host's dockerd mount namespace (see the module's docstring)."""
        return self.dir / "mntns"

    def ensure_mount_ns(self) -> None:
        """Make the host's dockerd mount namespace unless it is there: this
        host's plugin dir bound over the global discovery paths in it only."""
        if str(self.mount_ns) in mounts_under(self.dir):
            return
        # An ns file can only be bound on a private mount: the state dir,
        # bound onto itself and made private (teardown unmounts both).
        if str(self.dir) not in mounts_under(self.dir):
            _run(["mount", "--bind", str(self.dir), str(self.dir)])
            _run(["mount", "--make-private", str(self.dir)])
        self.mount_ns.touch()
        script = (
            f'mount --bind "$1" {PLUGIN_SOCKETS} && '
            '{ [ ! -d /etc/docker/plugins ] || mount --bind "$1" /etc/docker/plugins; }'
        )
        _run(
            [
                "unshare",
                f"--mount={self.mount_ns}",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "dockerd-mounts",
                str(self.plugin_dir),
            ]
        )

    def running(self) -> bool:
        if not self.socket.exists():
            return False
        return bool(_run(self.argv("version", "-f", "{{.Server.Version}}"), check=False).strip())

    def start(self) -> float:
        """Start dockerd, wait until `docker info` answers, import the image."""
        started = time.monotonic()
        for d in (self.dir / "data", self.dir / "exec", self.plugin_dir):
            d.mkdir(parents=True, exist_ok=True)
        make_missing_dirs(PLUGIN_SOCKETS, self.made_record)
        self.ensure_mount_ns()
        # Docker 20.10 keeps its identity key in /etc/docker/key.json unless
        # told otherwise (the key has no flag, only this config key): in the
        # host's own directory, so a lab writes nothing outside its state.
        daemon_config = {"deprecated-key-path": str(self.dir / "key.json")}
        (self.dir / "daemon.json").write_text(json.dumps(daemon_config) + "\n")
        (self.dir / "engine.json").write_text(
            json.dumps({"flavour": self.flavour, "live_restore": self.live_restore})
        )
        log = self.log.open("ab")
        proc = subprocess.Popen(
            self.dockerd_argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd="/",
        )
        log.close()
        deadline = time.monotonic() + ENGINE_WAIT_SECONDS
        while _run(self.argv("info", "-f", "{{.ID}}"), check=False).strip() == "":
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise EngineError(f"dockerd on h{self.host} did not start:\n{tail}")
            time.sleep(0.05)
        seconds = time.monotonic() - started
        if IMAGE not in self.cli("images", "--format", "{{.Repository}}"):
            self.cli("import", str(self.image_tar), IMAGE)
        return seconds

    def dockerd_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def stop_daemon(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """dockerd (and its containerd) stopped with SIGTERM, as systemd
        would, or first sent `sig` (SIGKILL: a crash, no shutdown of its
        containers); what happens to containers is Docker's (live-restore)."""
        pid = self.dockerd_pid()
        if pid is not None:
            if sig != signal.SIGTERM:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            stop_processes([pid], grace=30)
        # Its containerd exits with it; its shims stay with live-restore.
        stop_processes(
            p
            for p in processes_mentioning(str(self.dir))
            if "containerd-shim" not in proc_cmdline_argv0(p)
        )
        # After a kill, dockerd (our unwaited child) and its orphaned
        # containerd may linger as zombies and leave their pid files: the
        # next dockerd would take them for running and refuse to start, or
        # wait for that containerd in vain.
        for pidfile in (self.pidfile, self.dir / "exec" / "containerd" / "containerd.pid"):
            with contextlib.suppress(FileNotFoundError, ValueError):
                if _zombie(int(pidfile.read_text().strip())):
                    pidfile.unlink()

    def restart(self, sig: signal.Signals = signal.SIGTERM) -> float:
        self.stop_daemon(sig)
        return self.start()

    def teardown(self) -> None:
        if not self.dir.exists():
            return
        if self.running():
            ids = self.cli("ps", "-aq", check=False).split()
            if ids:
                self.cli("rm", "-f", *ids, check=False, timeout=120)
        self.stop_daemon()
        sweep_runc(self.dir / "exec" / "runtime-runc" / "moby")
        stop_processes(processes_mentioning(str(self.dir)))
        unmount_under(self.dir)
        remove_made_dirs(self.made_record, plugin_sockets_in_use)


def docker_opts_flags(env_text: str, key: str = "DOCKER_OPTS") -> list[str]:
    """The flags in `overlayctl docker-opts`'s env output (KEY="...")."""
    for line in env_text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name == key:
            return shlex.split(value.strip().strip('"'))
    raise EngineError(f"no {key}= line in docker-opts output: {env_text!r}")


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
