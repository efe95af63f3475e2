"""Podman on a lab host: no daemon, every command run with the host's
state and the CNI backend (overlay-cni, then portmap).

Podman's state (root, runroot, tmp dir, locks, runc's state, CNI config)
lives in <host dir>/podman; `lock_type = "file"` because the default
shared-memory locks are one segment for every Podman on the machine, and a
fresh runroot frees all of them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from overlayd.lab.engines.cleanup import (
    processes_mentioning,
    remove_netns_entries,
    stop_processes,
    sweep_runc,
    unmount_under,
)
from overlayd.lab.engines.common import (
    IMAGE,
    NETNS_RECORD,
    NETWORK,
    ULIMITS,
    Engine,
    EngineContainer,
)
from overlayd.lab.hosts import HostFiles
from overlayd.lab.netns import nsenter_argv


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
        register_endpoints: bool = True,
    ) -> None:
        super().__init__(host, ns, files, image_tar)
        # The network config's `dns` (CNI's DNS type), written at start:
        # overlay-cni passes it into its result, Podman writes resolv.conf.
        self.dns = dns
        # False for a host without a daemon to register containers with
        # (overlay-cni's registerEndpoint).
        self.register_endpoints = register_endpoints

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
        if not self.register_endpoints:
            overlay["registerEndpoint"] = False
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
        env: Mapping[str, str] | None = None,
    ) -> EngineContainer:
        found = super().run(name, command, publish=publish, extra=extra, env=env)
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
