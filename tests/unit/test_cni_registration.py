"""overlay-cni registers the containers it attaches (network policy): with
the daemon's real control socket server (serve_control) on a temporary
path, and the delegates (the bridge plugin) replaced by a recorder, since
they need root and namespaces (tests/lab covers them for real).

Every refusal here has its accepted twin in the same test."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from overlayd.cli import cni
from overlayd.cli.cni import CniError, Invocation
from overlayd.errors import OverlaydError
from overlayd.plan.endpoints import without_label_args
from overlayd.surfaces.control import serve_control

GWBRIDGE = (
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=false\nOVERLAYD_EGRESS=gwbridge\nOVERLAYD_BRIDGE=ovl0\n"
    "OVERLAYD_GWBRIDGE=ovl_gwbridge\nOVERLAYD_GWBRIDGE_SUBNET=172.18.0.1/16\n"
    "FLANNEL_IPV6_NETWORK=fd00:10:244::/48\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n"
)
ID = "4c9b5ccf83799860a04d1cb7b89c51395a49bf5dd8b749dccd7fa935aa1e9982"


class Daemon:
    """endpoint_add/endpoint_del as the agent answers them; `refuse` makes
    endpoint_add fail as the registry does."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.refuse: str | None = None

    def handlers(self) -> dict[str, Callable[[Mapping[str, Any]], Any]]:
        def add(args: Mapping[str, Any]) -> dict[str, Any]:
            self.calls.append(("endpoint_add", dict(args)))
            if self.refuse is not None:
                raise OverlaydError(self.refuse)
            return {"key": "k", "revision": 5}

        def delete(args: Mapping[str, Any]) -> dict[str, Any]:
            self.calls.append(("endpoint_del", dict(args)))
            return {"existed": True}

        return {"endpoint_add": add, "endpoint_del": delete}


@contextmanager
def running(path: Path, daemon: Daemon) -> Iterator[None]:
    """The control socket served from a thread of its own (overlay-cni runs
    its own event loop, as the separate process it is)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        async with serve_control(path, daemon.handlers()):
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(10)
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


class Delegates:
    """The bridge plugin, recorded: ADD answers like it (a host veth and
    the container's interface with its addresses)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []  # command, ifname, CNI_ARGS

    def __call__(
        self, inv: Invocation, command: str, ifname: str, conf: dict[str, Any]
    ) -> dict[str, Any] | None:
        self.calls.append((command, ifname, without_label_args(inv.args)))
        if command != "ADD":
            return None
        addresses = (
            ["10.244.7.5/24", "fd00:10:244:7:8000::5/64"] if ifname == "eth0" else ["172.18.0.9/16"]
        )
        mac = "0a:58:0a:f4:07:05" if ifname == "eth0" else "0a:58:ac:12:00:09"
        return {
            "interfaces": [
                {"name": f"veth-{ifname}", "mac": "ee:ee:ee:ee:ee:01"},
                {"name": ifname, "mac": mac, "sandbox": "/run/netns/c"},
            ],
            "ips": [{"address": a, "interface": 1} for a in addresses],
        }


@pytest.fixture
def delegates(monkeypatch: pytest.MonkeyPatch) -> Delegates:
    found = Delegates()
    monkeypatch.setattr(cni, "run_delegate", found)
    return found


def conf(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    (tmp_path / "subnet.env").write_text(GWBRIDGE)
    return {
        "cniVersion": "1.0.0",
        "name": "overlay",
        "type": "overlay-cni",
        "subnetFile": str(tmp_path / "subnet.env"),
        "dataDir": str(tmp_path / "cni"),
        "controlSocket": str(tmp_path / "run" / "overlayd.sock"),
        **extra,
    }


def invocation(args: str = "", container_id: str = ID) -> Invocation:
    return Invocation("ADD", container_id, "/run/netns/c", "eth0", args, [])


def record(tmp_path: Path) -> Path:
    return tmp_path / "cni" / "delegates" / f"{ID}-eth0.json"


def test_add_registers_the_overlay_addresses_name_and_labels(
    tmp_path: Path, delegates: Delegates
) -> None:
    daemon = Daemon()
    args = "IgnoreUnknown=1;K8S_POD_NAME=web-1;OVERLAYD_LABEL_app=web;OVERLAYD_LABEL_tier=front"
    config = conf(tmp_path, args={"labels": {"team": "a", "app": "old"}})
    with running(tmp_path / "run" / "overlayd.sock", daemon):
        result = cni.add(config, invocation(args))
    assert [ip["address"] for ip in result["ips"]][:2] == [
        "10.244.7.5/24",
        "fd00:10:244:7:8000::5/64",
    ]
    # eth1's gwbridge address is no overlay address: registered apart, as
    # the gwbridge's (egress policy judges the way out by it); the MACs are
    # eth0's and eth1's (link-local traffic on either bridge), not the host
    # veths'.
    assert daemon.calls == [
        (
            "endpoint_add",
            {
                "id": ID,
                "name": "web-1",
                "addresses": ["10.244.7.5", "fd00:10:244:7:8000::5"],
                "gwbridge_addresses": ["172.18.0.9"],
                "macs": ["0a:58:0a:f4:07:05", "0a:58:ac:12:00:09"],
                # CNI_ARGS win over the network config's args.
                "labels": {
                    "team": "a",
                    "app": "web",
                    "tier": "front",
                    "k8s.pod.name": "web-1",
                },
            },
        )
    ]
    # The delegates never see overlay-cni's own keys (the bridge plugin
    # refuses keys it does not know unless told IgnoreUnknown).
    assert [c[2] for c in delegates.calls] == ["IgnoreUnknown=1;K8S_POD_NAME=web-1"] * 2
    assert record(tmp_path).exists()


@pytest.mark.parametrize("how", ["refused", "unreachable"])
def test_a_failed_registration_fails_add_and_undoes_the_delegates(
    tmp_path: Path, delegates: Delegates, how: str
) -> None:
    daemon = Daemon()
    socket = tmp_path / "run" / "overlayd.sock"
    # Positive control: the same ADD is accepted while the daemon accepts.
    with running(socket, daemon):
        cni.add(conf(tmp_path), invocation())
        assert daemon.calls[-1][0] == "endpoint_add"
        cni.delete(conf(tmp_path), invocation())
        delegates.calls.clear()
        daemon.calls.clear()
        if how == "refused":
            daemon.refuse = "addresses[0]: 10.244.7.5 is outside host 10.244.9.0-24's subnets"
            with pytest.raises(CniError) as info:
                cni.add(conf(tmp_path), invocation())
    if how == "unreachable":
        with pytest.raises(CniError) as info:
            cni.add(conf(tmp_path), invocation())
    error = info.value
    assert "not attached" in error.msg and ID[:12] in error.msg
    if how == "refused":
        assert error.code == cni.ERR_PLUGIN and "outside host" in error.details
        # A registration that timed out may be in etcd: taken back too.
        assert [c[0] for c in daemon.calls] == ["endpoint_add", "endpoint_del"]
    else:
        assert error.code == cni.ERR_TRY_LATER and "is overlayd running" in error.details
    # Both interfaces were made and both taken away again, last first.
    assert [(c[0], c[1]) for c in delegates.calls] == [
        ("ADD", "eth0"),
        ("ADD", "eth1"),
        ("DEL", "eth1"),
        ("DEL", "eth0"),
    ]
    assert not record(tmp_path).exists()


def test_bad_labels_are_refused_before_anything_is_made(
    tmp_path: Path, delegates: Delegates
) -> None:
    for args in ("OVERLAYD_LABEL_app=two words", "OVERLAYD_LABEL_-x=y", "OVERLAYD_LABEL_app"):
        with pytest.raises(CniError) as info:
            cni.add(conf(tmp_path), invocation(args))
        assert info.value.code == cni.ERR_CONFIG and "OVERLAYD_LABEL_" in info.value.msg
    with pytest.raises(CniError) as info:
        cni.add(conf(tmp_path, args={"labels": {"app": 5}}), invocation())
    assert "args.labels" in info.value.msg
    assert delegates.calls == []
    # Positive control: a good label with the same (absent) daemon gets as
    # far as the delegates.
    with pytest.raises(CniError):
        cni.add(conf(tmp_path), invocation("OVERLAYD_LABEL_app=web"))
    assert delegates.calls[0][:2] == ("ADD", "eth0")


def test_register_endpoint_false_needs_no_daemon(tmp_path: Path, delegates: Delegates) -> None:
    config = conf(tmp_path, registerEndpoint=False)
    assert cni.add(config, invocation())["ips"]
    cni.delete(config, invocation())
    assert [c[0] for c in delegates.calls] == ["ADD", "ADD", "DEL", "DEL"]
    with pytest.raises(CniError) as info:
        cni.add(conf(tmp_path, registerEndpoint="no"), invocation())
    assert info.value.code == cni.ERR_CONFIG
    with pytest.raises(CniError) as info:
        cni.add(conf(tmp_path, controlSocket="relative.sock"), invocation())
    assert info.value.code == cni.ERR_CONFIG


def test_del_unregisters_first_and_never_fails_for_a_daemon_that_is_down(
    tmp_path: Path, delegates: Delegates, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = Daemon()
    socket = tmp_path / "run" / "overlayd.sock"
    with running(socket, daemon):
        cni.add(conf(tmp_path), invocation())
        delegates.calls.clear()
        cni.delete(conf(tmp_path), invocation())
        assert daemon.calls[-1] == ("endpoint_del", {"id": ID})
    assert [c[0] for c in delegates.calls] == ["DEL", "DEL"]
    # Again, with the daemon gone: the delegates' DEL still runs, and the
    # miss is said on stderr (stdout is the CNI result's).
    cni.add(conf(tmp_path, registerEndpoint=False), invocation())
    delegates.calls.clear()
    capsys.readouterr()
    cni.delete(conf(tmp_path), invocation())
    assert [c[0] for c in delegates.calls] == ["DEL", "DEL"]
    out = capsys.readouterr()
    assert out.out == "" and "not unregistered" in out.err


def test_the_name_is_k8s_pod_name_or_the_ids_first_12_characters() -> None:
    assert cni.container_name(invocation("IgnoreUnknown=1;K8S_POD_NAME=exp1")) == "exp1"
    assert cni.container_name(invocation("IgnoreUnknown=1")) == ID[:12]
    assert cni.container_name(invocation("K8S_POD_NAME=")) == ID[:12]


def test_only_the_container_side_interface_counts() -> None:
    result = {
        "interfaces": [
            {"name": "veth1"},
            {"name": "eth0", "sandbox": "/run/netns/c"},
            {"name": "eth0"},  # a host-side interface that happens to be called eth0
        ],
        "ips": [
            {"address": "10.244.7.5/24", "interface": 1},
            {"address": "10.244.7.6/24", "interface": 2},
            {"address": "10.244.7.7/24"},
        ],
    }
    assert cni.container_addresses(result, "eth0") == ["10.244.7.5"]
    assert json.dumps(cni.container_addresses({}, "eth0")) == "[]"
