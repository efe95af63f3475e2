"""Operator plumbing that needs no root: the control socket, the HTTP
endpoint, docker-opts, and the settings overlayctl and the daemon share."""

from __future__ import annotations

import asyncio
import json
import stat
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from overlayd.cli import ctl
from overlayd.cli.docker import docker_options
from overlayd.config import build_agent_config
from overlayd.errors import ConfigError, OverlaydError
from overlayd.lab.engines.docker import docker_opts_flags
from overlayd.surfaces.control import (
    MAX_REQUEST_BYTES,
    DaemonRefused,
    DaemonUnreachable,
    ask,
    serve_control,
)
from overlayd.surfaces.httpd import MetricsServer
from overlayd.surfaces.notify import watchdog_interval
from overlayd.surfaces.telemetry import Telemetry


async def test_control_socket_answers_and_is_root_only(tmp_path: Path) -> None:
    path = tmp_path / "run" / "overlayd.sock"
    async with serve_control(path, {"status": lambda args: {"ready": True}}):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert await ask(path, "status") == {"ready": True}
        with pytest.raises(DaemonRefused, match="unknown command 'nope'"):
            await ask(path, "nope")
    assert not path.exists()


async def test_control_requests_carry_arguments_and_refusals_come_back_as_errors(
    tmp_path: Path,
) -> None:
    path = tmp_path / "overlayd.sock"

    async def register(args: Mapping[str, Any]) -> dict[str, Any]:
        if "id" not in args:
            raise OverlaydError("id: missing")
        await asyncio.sleep(0)
        return {"registered": args["id"]}

    def broken(args: Mapping[str, Any]) -> None:
        raise RuntimeError("a bug")

    async with serve_control(path, {"register": register, "broken": broken}):
        assert await ask(path, "register", {"id": "c1"}) == {"registered": "c1"}
        with pytest.raises(DaemonRefused, match="id: missing"):
            await ask(path, "register", {})
        with pytest.raises(DaemonRefused, match="broken failed inside overlayd"):
            await ask(path, "broken")
        # The server survived both.
        assert await ask(path, "register", {"id": "c2"}) == {"registered": "c2"}


async def _raw_request(path: Path, payload: bytes) -> dict[str, Any]:
    """One request as bytes, the whole of it sent before the answer is read."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
    writer.write(payload)
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), timeout=10)
    writer.close()
    answer: dict[str, Any] = json.loads(line)
    return answer


async def test_every_malformed_request_is_answered_with_an_error_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, a request that was not JSON, nested too deeply or longer than
    the limit was dropped without an answer (and deep nesting escaped as an
    unhandled exception): the client waited for nothing."""
    path = tmp_path / "overlayd.sock"
    calls: list[Mapping[str, Any]] = []
    nested = b'{"command": "register", "args": ' + b"[" * 30_000 + b"\n"
    cases = {
        b"not json\n": "request is not JSON: Expecting value",
        b"\xff\xfe\n": "request is not JSON",
        b"[1, 2]\n": "request: must be a JSON object",
        nested: "nested too deeply",
        b"x" * (MAX_REQUEST_BYTES + 10) + b"\n": f"longer than {MAX_REQUEST_BYTES} bytes",
        b'{"command": "register", "args": [1]}\n': "args: must be an object",
        b'{"command": 7}\n': "unknown command 7",
    }
    async with serve_control(path, {"register": calls.append}):
        for payload, reason in cases.items():
            answer = await _raw_request(path, payload)
            assert reason in answer.get("error", ""), (payload[:40], answer)
        # Nothing reached the handler, and the server still answers.
        assert calls == []
        assert await ask(path, "register", {"id": "c1"}) is None
        assert calls == [{"id": "c1"}]
    assert not [r for r in caplog.records if r.exc_info]


async def test_no_daemon_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnreachable, match="does not exist: is overlayd running"):
        await ask(tmp_path / "missing.sock", "status")


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_http_endpoint_serves_metrics_health_and_readiness() -> None:
    telemetry = Telemetry()
    server = MetricsServer(("127.0.0.1", 0), telemetry)
    port = server.port
    server.start()
    try:
        base = f"http://127.0.0.1:{port}"
        assert fetch(base + "/healthz") == (200, "ok\n")
        assert fetch(base + "/readyz") == (503, "no lease held\n")
        status, text = fetch(base + "/metrics")
        assert status == 200
        for name in (
            "overlayd_lease_ttl_seconds",
            "overlayd_peers",
            "overlayd_reconcile_duration_seconds",
            "overlayd_changes_applied",
            "overlayd_drift_repaired",
            "overlayd_etcd_reconnects_total",
            "overlayd_watch_lag_seconds",
            "overlayd_leases_skipped",
        ):
            assert name in text
        assert fetch(base + "/other")[0] == 404
    finally:
        server.stop()


def test_a_metrics_port_in_use_is_a_clear_config_error() -> None:
    first = MetricsServer(("127.0.0.1", 0), Telemetry())
    try:
        with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1:") as error:
            MetricsServer(("127.0.0.1", first.port), Telemetry())
        assert error.value.field == "metrics-address"
    finally:
        first.stop()


def test_watchdog_interval_is_half_of_systemds_and_only_for_us() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None


@pytest.mark.parametrize(
    ("setting", "value", "field"),
    [
        ("metrics-address", "localhost", "metrics-address"),
        ("metrics-address", "127.0.0.1:99999", "metrics-address"),
        ("mqtt-url", "http://broker", "mqtt-url"),
        ("mqtt-url", "mqtt://", "mqtt-url"),
        ("mqtt-topic", "a/#", "mqtt-topic"),
        ("log-format", "xml", "log-format"),
    ],
)
def test_bad_operator_settings_name_their_field(setting: str, value: str, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_agent_config(flags={setting: value}, env={})
    assert error.value.field == field


def test_operator_settings_have_sane_defaults() -> None:
    s = build_agent_config(flags={}, env={})
    assert s.metrics_address == ("127.0.0.1", 9469)
    assert s.mqtt_url is None
    assert str(s.control_socket) == "/run/overlayd/overlayd.sock"
    assert build_agent_config(flags={"metrics-address": "off"}, env={}).metrics_address is None


SUBNET_ENV = (
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=true\nOVERLAYD_EGRESS=masquerade\nOVERLAYD_BRIDGE=ovl0\n"
)


def test_docker_opts_put_docker_on_the_bridge_subnet_and_mtu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = tmp_path / "subnet.env"
    env.write_text(SUBNET_ENV)
    options = docker_options(env)
    assert options["subnet"] == "10.244.7.0/24" and options["mtu"] == 1450
    out = tmp_path / "docker_opts.env"
    assert ctl.main(["docker-opts", "--subnet-file", str(env), "--out", str(out)]) == 0
    assert (
        'DOCKER_OPTS="--bridge=ovl0 --fixed-cidr=10.244.7.128/25 --mtu=1450 --ip-masq=false"'
        in out.read_text()
    )
    capsys.readouterr()
    assert ctl.main(["docker-opts", "--subnet-file", str(env), "--format", "daemon-json",
                     "--out", "-"]) == 0  # fmt: skip
    daemon_json = json.loads(capsys.readouterr().out)
    assert daemon_json == {
        "bridge": "ovl0",
        "fixed-cidr": "10.244.7.128/25",  # the upper half: host-local has the lower
        "mtu": 1450,
        "ip-masq": False,
    }


def test_dual_stack_docker_opts_add_ipv6_with_docker_in_the_lower_half(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """dockerd 20.10's --fixed-cidr-v6 is the whole IPv6 subnet (so Docker
    keeps overlayd's gateway and its containers the subnet's prefix; their
    MAC-made addresses are in the lower half), a network's --ip-range the
    lower half; host-local has the upper half (plan/ipam.py)."""
    env = tmp_path / "subnet.env"
    env.write_text(SUBNET_ENV)
    for fmt in ("env", "daemon-json", "network-create"):  # IPv4 only: no IPv6 flag at all
        assert (
            ctl.main(["docker-opts", "--subnet-file", str(env), "--format", fmt, "--out", "-"]) == 0
        )
        assert "ipv6" not in capsys.readouterr().out
    assert docker_options(env)["subnet6"] is None
    v6 = "FLANNEL_IPV6_NETWORK=fd00:10:244::/48\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n"
    env.write_text(SUBNET_ENV + v6)
    options = docker_options(env)
    assert (
        options["subnet6"],
        options["fixed_cidr6"],
        options["ip_range6"],
        options["gateway6"],
    ) == (
        "fd00:10:244:7::/64",
        "fd00:10:244:7::/64",
        "fd00:10:244:7::/65",
        "fd00:10:244:7::1",
    )
    assert ctl.main(["docker-opts", "--subnet-file", str(env), "--out", "-"]) == 0
    text = capsys.readouterr().out
    assert 'DOCKER_OPT_IPV6="--ipv6 --fixed-cidr-v6=fd00:10:244:7::/64"' in text
    assert docker_opts_flags(text)[-2:] == ["--ipv6", "--fixed-cidr-v6=fd00:10:244:7::/64"]
    assert ctl.main(["docker-opts", "--subnet-file", str(env), "--format", "daemon-json",
                     "--out", "-"]) == 0  # fmt: skip
    daemon_json = json.loads(capsys.readouterr().out)
    assert daemon_json["ipv6"] is True
    assert daemon_json["fixed-cidr-v6"] == "fd00:10:244:7::/64"
    assert ctl.main(["docker-opts", "--subnet-file", str(env), "--format", "network-create",
                     "--out", "-"]) == 0  # fmt: skip
    create = capsys.readouterr().out
    assert (
        "--subnet 10.244.7.0/24 --gateway 10.244.7.1 --ip-range 10.244.7.128/25"
        " --ipv6 --subnet fd00:10:244:7::/64 --gateway fd00:10:244:7::1"
        " --ip-range fd00:10:244:7::/65 -o "
    ) in create
    # Longer than /79: Docker's MAC-made addresses would spread over host-local's half.
    env.write_text(SUBNET_ENV + v6.replace("/64", "/96"))
    for fmt, ok in (("env", 1), ("daemon-json", 1), ("network-create", 0)):
        assert ctl.main(["docker-opts", "--subnet-file", str(env), "--format", fmt,
                         "--out", "-"]) == ok  # fmt: skip
        out = capsys.readouterr()
        assert ("longer than /79" in out.err) == bool(ok), out
    env.write_text(SUBNET_ENV + "FLANNEL_IPV6_SUBNET=10.244.7.1/24\n")
    with pytest.raises(OverlaydError, match=r"FLANNEL_IPV6_SUBNET.*not an IPv6"):
        docker_options(env)


def test_docker_opts_without_a_subnet_file_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl.main(["docker-opts", "--subnet-file", str(tmp_path / "none"), "--out", "-"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("overlayctl: ") and "is overlayd ready?" in err
    assert "\n" not in err
    with pytest.raises(OverlaydError):
        docker_options(tmp_path / "none")


def test_status_without_a_daemon_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl.main(["status", "--control-socket", str(tmp_path / "x.sock")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"overlayctl: {tmp_path / 'x.sock'} does not exist: is overlayd running?"


@pytest.mark.parametrize(
    "command",
    [["status"], ["peers"], ["leases"], ["diagnose"], ["network", "show"], ["network", "set"],
     ["events"], ["docker-opts"], ["check"], ["leave"]],
)  # fmt: skip
def test_every_command_has_help_and_json(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        ctl.main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: overlayctl" in out and "--json" in out
