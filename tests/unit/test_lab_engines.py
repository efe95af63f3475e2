"""The pure parts of the lab's engine code: reading what the engines
report, the flags and configs handed to them, the busybox image's tarball,
telling overlayd's processes from an engine's, and `lab run`'s options."""

from __future__ import annotations

import argparse
import json
import stat
import tarfile
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from overlayd.cli import ctl
from overlayd.cli.labctl import split_run_command
from overlayd.lab.engines import (
    REQUIRED_APPLETS,
    Docker,
    EngineError,
    Podman,
    build_busybox_tarball,
    docker_opts_flags,
    names_path_under,
    parse_inspect,
    parse_publish,
)
from overlayd.lab.hosts import HostFiles, is_daemon_cmdline


def test_inspect_of_podman_names_the_cni_network_address() -> None:
    raw = {
        "Id": "abc",
        "Name": "web",
        "State": {"Pid": 42},
        "NetworkSettings": {"Networks": {"overlay": {"IPAddress": "10.244.1.3"}}},
    }
    c = parse_inspect("podman", 2, raw)
    assert (c.name, c.pid, c.address) == ("web", 42, IPv4Address("10.244.1.3"))
    assert c.netns_path == "/proc/42/ns/net"
    assert c.title == "h2/podman/web"


def test_inspect_of_docker_strips_the_slash_and_skips_empty_networks() -> None:
    raw = {
        "Id": "def",
        "Name": "/cli",
        "State": {"Pid": 0},
        "NetworkSettings": {
            "Networks": {"none": {"IPAddress": ""}, "bridge": {"IPAddress": "10.244.1.130"}}
        },
    }
    c = parse_inspect("docker", 1, raw)
    assert c.name == "cli"
    assert c.addresses == {"bridge": IPv4Address("10.244.1.130")}
    assert c.address == IPv4Address("10.244.1.130")
    stopped = parse_inspect("docker", 1, {"Id": "x", "NetworkSettings": None, "State": None})
    assert stopped.address is None and stopped.pid == 0


@pytest.mark.parametrize("spec", ["8080", "a:80", "8080:", "0:80", "8080:70000", ":80"])
def test_publish_specs_that_are_refused(spec: str) -> None:
    with pytest.raises(EngineError):
        parse_publish(spec)


def test_publish_spec_accepted() -> None:
    assert parse_publish("8080:80") == (8080, 80)


def test_docker_opts_flags_come_from_the_env_line() -> None:
    text = (
        "DOCKER_OPT_BIP=\nDOCKER_OPT_MTU=--mtu=1450\n"
        'DOCKER_OPTS="--bridge=ovl0 --fixed-cidr=10.244.1.128/25 --mtu=1450 --ip-masq=false"\n'
    )
    assert docker_opts_flags(text) == [
        "--bridge=ovl0",
        "--fixed-cidr=10.244.1.128/25",
        "--mtu=1450",
        "--ip-masq=false",
    ]
    with pytest.raises(EngineError, match="no DOCKER_OPTS= line"):
        docker_opts_flags("DOCKER_OPT_MTU=--mtu=1450\n")


@pytest.mark.parametrize(
    ("argv", "daemon"),
    [
        (["/venv/bin/python", "-m", "overlayd.cli.daemon", "--iface", "eth0"], True),
        (["/venv/bin/python", "/venv/bin/overlayd", "--iface", "eth0"], True),
        (["/usr/sbin/dockerd", "--data-root", "/run/overlayd-lab/x/h1/docker"], False),
        (["/usr/bin/conmon", "-b", "/run/overlayd-lab/overlayd/h1/podman"], False),
        (["/venv/bin/python", "-m", "overlayd.lab.whoami", "serve", "8080"], False),
        ([], False),
    ],
)
def test_only_overlayd_counts_as_the_daemon(argv: list[str], daemon: bool) -> None:
    assert is_daemon_cmdline(argv) is daemon


@pytest.mark.parametrize(
    ("arg", "under"),
    [
        ("/run/l/h1/docker", True),
        ("/run/l/h1/docker/data", True),
        ("--exec-root=/run/l/h1/docker/exec", True),
        ("unix:///run/l/h1/docker/docker.sock", True),
        ("/run/l/h1/docker-plugins/overlayd.sock", False),
        ("/run/l/h11/docker/data", False),
    ],
)
def test_engine_processes_are_found_by_their_state_dir_only(arg: str, under: bool) -> None:
    assert names_path_under(arg, "/run/l/h1/docker") is under


def fake_busybox(tmp_path: Path, applets: list[str]) -> Path:
    script = tmp_path / "busybox"
    script.write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(applets) + "\n")
    script.chmod(0o755)
    return script


def test_busybox_tarball_has_a_link_per_applet_and_the_web_root(tmp_path: Path) -> None:
    applets = [*REQUIRED_APPLETS, "busybox", "vi"]
    target = build_busybox_tarball(tmp_path / "cache" / "bb.tar", fake_busybox(tmp_path, applets))
    with tarfile.open(target) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["bin/busybox"].isfile()
        assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
        assert "bin/vi" in members and "bin/busybox" in members
        assert stat.S_IMODE(members["tmp"].mode) == 0o1777
        page = tar.extractfile("www/index.html")
        assert page is not None and page.read() == b"overlayd-busybox\n"
    # Built once: a second call keeps the file (no temporary left behind).
    before = target.stat().st_mtime_ns
    assert build_busybox_tarball(target, fake_busybox(tmp_path, applets)) == target
    assert target.stat().st_mtime_ns == before
    assert [p.name for p in target.parent.iterdir()] == ["bb.tar"]


def test_busybox_without_the_needed_applets_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="httpd"):
        build_busybox_tarball(tmp_path / "bb.tar", fake_busybox(tmp_path, ["sh", "sleep"]))
    assert not (tmp_path / "bb.tar").exists()


def test_podman_config_chains_portmap_after_overlay_cni_with_its_own_state(
    tmp_path: Path,
) -> None:
    files = HostFiles(tmp_path / "h1")
    podman = Podman(1, "ovl-x-h1", files, tmp_path / "bb.tar", dns={"nameservers": ["1.2.3.4"]})
    conflist = podman.conflist()
    assert conflist["name"] == "overlay"
    first, second = conflist["plugins"]
    assert first["type"] == "overlay-cni"
    assert first["subnetFile"] == str(files.subnet_file)
    assert first["dataDir"] == str(files.cni_dir)
    assert first["dns"] == {"nameservers": ["1.2.3.4"]}
    assert second == {"type": "portmap", "capabilities": {"portMappings": True}}
    conf = podman.containers_conf()
    for line in ('lock_type = "file"', 'runtime = "runc"', 'cgroup_manager = "cgroupfs"'):
        assert line in conf
    assert '"nofile=1024:1024"' in conf
    argv = podman.argv("ps")
    assert argv[:2] == ["nsenter", "--net=/run/netns/ovl-x-h1"]
    assert str(files.root / "podman" / "root") in argv and argv[-1] == "ps"


def test_plain_dockerd_has_no_bridge_and_runs_in_its_host_s_mount_namespace(
    tmp_path: Path,
) -> None:
    files = HostFiles(tmp_path / "h1")
    docker = Docker(1, "ovl-x-h1", files, tmp_path / "bb.tar", "plain")
    argv = docker.dockerd_argv()
    assert argv[:2] == ["nsenter", "--net=/run/netns/ovl-x-h1"]
    # The host's own mount namespace, kept across dockerd restarts (its
    # plugin dir is bound over /run/docker/plugins there).
    assert argv[2:4] == [f"--mount={files.root / 'docker' / 'mntns'}", "dockerd"]
    assert docker.plugin_dir == files.root / "docker-plugins"
    assert "--bridge=none" in argv and "--live-restore" not in argv
    assert argv.count("--default-ulimit") == 2
    assert docker.argv("ps")[:3] == ["/usr/bin/docker", "-H", f"unix://{docker.socket}"]
    with pytest.raises(EngineError, match="flavour"):
        Docker(1, "ovl-x-h1", files, tmp_path / "bb.tar", "swarm")


def test_a_started_dockerd_keeps_its_flavour(tmp_path: Path) -> None:
    files = HostFiles(tmp_path / "h1")
    (files.root / "docker").mkdir(parents=True)
    (files.root / "docker" / "engine.json").write_text(
        json.dumps({"flavour": "plain", "live_restore": True})
    )
    docker = Docker(1, "ovl-x-h1", files, tmp_path / "bb.tar")
    assert (docker.flavour, docker.live_restore) == ("plain", True)


def parse_run(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    args = ctl.parser().parse_args(["lab", "run", *argv])
    return split_run_command(args, args.command)


def test_lab_run_options_after_the_host_and_the_command_after_dashes() -> None:
    args, command = parse_run(
        ["--lab", "x", "-p", "1:2", "h2", "--name", "web", "-p", "8080:80", "--", "httpd", "-f"]
    )
    assert (args.name, args.host, args.container, args.engine) == ("x", "h2", "web", "podman")
    assert args.publish == ["1:2", "8080:80"]
    assert command == ["httpd", "-f"]
    args, command = parse_run(["h1", "--engine", "docker", "--", "sleep", "--name"])
    assert (args.engine, args.container, command) == ("docker", None, ["sleep", "--name"])
