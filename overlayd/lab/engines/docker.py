"""dockerd on a lab host, on overlayd's bridge with the `docker-opts` flags
(docker_opts_flags reads them) or plain for a network plugin.

dockerd runs in the host's network namespace AND a private mount
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
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from overlayd.lab.engines.cleanup import (
    MADE_RECORD,
    PLUGIN_SOCKETS,
    is_zombie,
    make_missing_dirs,
    mounts_under,
    plugin_sockets_in_use,
    proc_cmdline_argv0,
    processes_mentioning,
    remove_made_dirs,
    stop_processes,
    sweep_runc,
    unmount_under,
)
from overlayd.lab.engines.common import (
    DOCKER,
    DOCKER_FLAVOURS,
    ENGINE_WAIT_SECONDS,
    IMAGE,
    ULIMITS,
    Engine,
    EngineError,
    run_command,
)
from overlayd.lab.hosts import HostFiles
from overlayd.lab.netns import nsenter_argv


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
        out = run_command(
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
            run_command(["mount", "--bind", str(self.dir), str(self.dir)])
            run_command(["mount", "--make-private", str(self.dir)])
        self.mount_ns.touch()
        script = (
            f'mount --bind "$1" {PLUGIN_SOCKETS} && '
            '{ [ ! -d /etc/docker/plugins ] || mount --bind "$1" /etc/docker/plugins; }'
        )
        run_command(
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
        return bool(
            run_command(self.argv("version", "-f", "{{.Server.Version}}"), check=False).strip()
        )

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
        while run_command(self.argv("info", "-f", "{{.ID}}"), check=False).strip() == "":
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
                if is_zombie(int(pidfile.read_text().strip())):
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
