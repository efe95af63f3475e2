"""The files that install overlayd on real machines: the systemd unit and
the Vagrantfile, checked by the tools that will read them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "overlayd.service"


def unit_settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_unit_passes_systemd_analyze_verify_without_warnings(tmp_path: Path) -> None:
    # verify checks that ExecStart exists; point it at this checkout's overlayd
    # (the install script puts it at /usr/local/bin/overlayd).
    overlayd = Path(sys.executable).parent / "overlayd"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/overlayd " in text
    copy = tmp_path / "overlayd.service"
    copy.write_text(text.replace("/usr/local/bin/overlayd", str(overlayd)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_the_unit_waits_for_readiness_feeds_a_watchdog_and_drops_privileges() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["WatchdogSec"] and s["Restart"] == ["on-failure"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert s["ProtectSystem"] == ["strict"] and s["PrivateTmp"] == ["yes"]
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["RuntimeDirectory"] == ["overlayd flannel"] and s["StateDirectory"] == ["overlayd"]
    # The daemon writes /proc/sys/net: kernel tunables must stay writable.
    assert "ProtectKernelTunables" not in s


def vagrant(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # --ignore-provider: validate needs no hypervisor then; a fresh machine
        # (and CI) has none, and without one vagrant refuses to validate at all.
        ["vagrant", "validate", "--ignore-provider"],
        cwd=ROOT / "vagrant",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            **os.environ,
            # Vagrant's own state goes to the test's directory, not the checkout.
            "VAGRANT_HOME": str(tmp_path / "home"),
            "VAGRANT_DOTFILE_PATH": str(tmp_path / "dotfile"),
            "VAGRANT_CHECKPOINT_DISABLE": "1",
            **env,
        },
    )


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="needs vagrant")
def test_the_vagrantfile_validates_for_three_and_for_five_vms(tmp_path: Path) -> None:
    for count in ("3", "5"):
        proc = vagrant(tmp_path, OVERLAYD_VMS=count)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "validated successfully" in proc.stdout


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="needs vagrant")
def test_the_vagrantfile_refuses_a_bad_vm_count(tmp_path: Path) -> None:
    proc = vagrant(tmp_path, OVERLAYD_VMS="0")
    assert proc.returncode != 0
    assert "OVERLAYD_VMS must be between 1 and 50" in proc.stdout + proc.stderr


def test_the_vagrantfile_provisions_with_the_readme_install_script() -> None:
    text = (ROOT / "vagrant" / "Vagrantfile").read_text()
    assert "bootstrap.sh install-etcd" in text and 'bootstrap.sh install"' in text
    assert "overlayctl check --expect-hosts" in text
    readme = (ROOT / "README.md").read_text()
    assert "./bootstrap.sh install" in readme


CONFLIST = ROOT / "config" / "overlay.conflist"


def test_the_installed_conflist_chains_portmap_after_overlay_cni_with_the_defaults() -> None:
    from overlayd.cli.cni import DEFAULT_DATA_DIR
    from overlayd.config import DEFAULT_SUBNET_FILE

    conflist = json.loads(CONFLIST.read_text())
    overlay, portmap = conflist["plugins"]
    assert overlay["type"] == "overlay-cni" and portmap["type"] == "portmap"
    assert overlay["subnetFile"] == str(DEFAULT_SUBNET_FILE)
    assert overlay["dataDir"] == DEFAULT_DATA_DIR
    assert portmap["capabilities"] == {"portMappings": True}
    assert "bootstrap.sh install" in (ROOT / "README.md").read_text()
    assert "10-overlay.conflist" in (ROOT / "bootstrap.sh").read_text()


@pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman")
def test_podman_reads_the_installed_conflist_as_the_overlay_network(tmp_path: Path) -> None:
    net_dir = tmp_path / "net.d"
    net_dir.mkdir()
    shutil.copy(CONFLIST, net_dir / "10-overlay.conflist")
    # Where `bootstrap.sh install` puts overlay-cni (/opt/cni/bin), this
    # checkout has its own: podman checks that every plugin exists.
    containers_conf = tmp_path / "containers.conf"
    plugin_dirs = [str(Path(sys.executable).parent), "/usr/lib/cni"]
    containers_conf.write_text(f"[network]\ncni_plugin_dirs = {json.dumps(plugin_dirs)}\n")
    # podman refuses a runroot longer than 50 characters, and tmp_path's are.
    runroot = Path(tempfile.mkdtemp(prefix="ovl-rr-"))
    try:
        # In a network namespace of its own: podman touches no network to
        # read a config, and this keeps it that way.
        proc = subprocess.run(
            ["unshare", "--net", "podman", "--root", str(tmp_path / "root"),
             "--runroot", str(runroot), "--network-config-dir", str(net_dir),
             "--network-backend", "cni", "network", "inspect", "overlay"],
            capture_output=True, text=True, check=False, timeout=60,
            env={**os.environ, "CONTAINERS_CONF": str(containers_conf)},
        )  # fmt: skip
    finally:
        shutil.rmtree(runroot, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    (network,) = json.loads(proc.stdout)
    assert network["name"] == "overlay"
    assert network["driver"] == "overlay-cni"
