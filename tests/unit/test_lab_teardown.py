"""The lab's teardown keeps going: a damaged engine state or a failing
engine teardown does not stop `lab down` half way; what the lab made in the
root mount namespace is removed once unused, and nothing else; and no
command is run in the root network namespace."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from overlayd.lab import engines, netns
from overlayd.lab.engines import (
    EngineError,
    make_missing_dirs,
    remove_made_dirs,
    teardown_host,
)
from overlayd.lab.hosts import HostFiles
from overlayd.lab.lab import Lab
from overlayd.lab.netns import LabCommandError, RootNamespaceError


def test_a_damaged_engine_json_does_not_stop_the_teardown(tmp_path: Path) -> None:
    files = HostFiles(tmp_path / "lab" / "h1")
    (files.root / "docker").mkdir(parents=True)
    (files.root / "docker" / "engine.json").write_text('{"flavour": ')
    # Control: read for use, the damaged file is an error.
    with pytest.raises(json.JSONDecodeError):
        engines.Docker(1, "ns", files, Path())
    teardown_host(1, "ns", files, Path())  # nothing ran, nothing raised


def test_a_failing_engine_is_swept_and_reported_after_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = HostFiles(tmp_path / "lab" / "h1")
    for kind in ("podman", "docker"):
        (files.root / kind).mkdir(parents=True)
    torn: list[str] = []
    swept: list[Path] = []

    def podman_fails(self: engines.Podman) -> None:
        raise EngineError("podman hung")

    monkeypatch.setattr(engines.Podman, "teardown", podman_fails)
    monkeypatch.setattr(engines.Docker, "teardown", lambda self: torn.append(self.kind))

    def sweep(directory: Path) -> list[str]:
        swept.append(directory)
        return []

    monkeypatch.setattr(engines, "sweep_state_dir", sweep)
    with pytest.raises(EngineError, match="podman: podman hung"):
        teardown_host(1, "ns", files, Path())
    assert torn == ["docker"]  # the other engine still went
    assert swept == [files.root / "podman"]  # and the failed one was swept from disk


def test_lab_down_goes_on_past_a_host_whose_engines_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab("ufaildown", state_root=tmp_path)
    for host in (1, 2):
        lab.files(host).root.mkdir(parents=True)
    tried: list[int] = []

    def teardown(host: int, ns: str, files: HostFiles, image_tar: Path) -> None:
        tried.append(host)
        if host == 1:
            raise TimeoutError("dockerd did not answer")

    monkeypatch.setattr(engines, "teardown_host", teardown)
    with pytest.raises(LabCommandError, match="h1: TimeoutError: dockerd did not answer"):
        lab.down()
    assert tried == [1, 2]
    assert lab.state_dir.exists()  # kept, for `lab down` run again
    # Control: once teardown works, down removes the state.
    monkeypatch.setattr(engines, "teardown_host", lambda *args: None)
    lab.down()
    assert not lab.state_dir.exists()


def test_only_made_dirs_are_removed_and_only_when_unused(tmp_path: Path) -> None:
    existing = tmp_path / "run"
    existing.mkdir()
    target = existing / "docker" / "plugins"
    record = tmp_path / "state" / "made-dirs"
    make_missing_dirs(target, record)
    assert target.is_dir()
    assert record.read_text().split() == [str(existing / "docker"), str(target)]
    make_missing_dirs(target, record)  # there already: nothing more recorded
    assert len(record.read_text().split()) == 2
    remove_made_dirs(record, lambda: True)  # in use: stays
    assert target.is_dir()
    remove_made_dirs(record, lambda: False)
    assert not (existing / "docker").exists()
    assert existing.is_dir()  # not made by the lab
    assert not record.exists()


def test_a_dir_made_by_someone_else_is_never_recorded(tmp_path: Path) -> None:
    target = tmp_path / "docker" / "plugins"
    target.mkdir(parents=True)
    record = tmp_path / "made-dirs"
    make_missing_dirs(target, record)
    assert not record.exists()
    remove_made_dirs(record, lambda: False)
    assert target.is_dir()


def test_the_root_network_namespace_is_never_entered(tmp_path: Path) -> None:
    # The namespace this test runs in, and its parent's, as a dead
    # container's reused PID would name them; PID 1's when we may read it.
    paths = ["/proc/self/ns/net", f"/proc/{os.getppid()}/ns/net"]
    if os.access("/proc/1/ns/net", os.R_OK):
        paths.append("/proc/1/ns/net")
    for path in paths:
        with pytest.raises(RootNamespaceError, match="root network namespace"):
            netns.nsenter_argv(path, "ping", "192.0.2.1")
        with pytest.raises(RootNamespaceError):
            netns.enter_argv(path, "true")
    # Controls: a path that is not the root's, and a lab namespace by name
    # (not there: nsenter would refuse it), give the command line.
    other = tmp_path / "netns"
    other.touch()
    assert netns.nsenter_argv(str(other), "true") == ["nsenter", f"--net={other}", "true"]
    assert netns.nsenter_argv("ovl-x-h1", "true", mount="/m") == [
        "nsenter",
        "--net=/run/netns/ovl-x-h1",
        "--mount=/m",
        "true",
    ]
