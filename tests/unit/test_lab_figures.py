"""The pure parts of the dual-stack figure commands: `lab bench`'s paths,
paired ratios and report, `lab converge`'s lease-key reading and figures,
`lab cpbench`'s check that a dual run is dual, and their arguments. No lab
is built and nothing is timed here."""

from __future__ import annotations

import math
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from overlayd.cli import ctl
from overlayd.lab import bench, converge, cpbench, rr

# --- lab bench ----------------------------------------------------------------


def test_paths_are_the_ipv4_four_and_their_ipv6_twins_when_dual() -> None:
    assert bench.paths_for("v4") == ("underlay", "routed", "overlay", "flannel")
    six = ("underlay6", "routed6", "overlay6", "flannel6")
    assert bench.paths_for("dual") == (*bench.PATHS, *six)
    with pytest.raises(ValueError, match="families"):
        bench.paths_for("v6")


def test_ratio_groups_add_the_v6_over_v4_pairs_only_when_dual() -> None:
    assert [title for title, _ in bench.ratio_groups("v4")] == ["IPv4 paths"]
    groups = dict(bench.ratio_groups("dual"))
    over = groups["IPv6 over IPv4, each path against its IPv4 twin"]
    assert ("overlay6", "overlay") in over and ("routed6", "routed") in over
    # Every pair names paths the run measures.
    for _, pairs in bench.ratio_groups("dual"):
        for num, den in pairs:
            assert {num, den} <= set(bench.paths_for("dual"))


def test_paired_ratio_is_taken_within_each_round_then_summarised() -> None:
    # Paired: round by round 2/1, 3/2, 4/4; not median(num)/median(den) = 3/2.
    got = bench.paired_ratio([2.0, 3.0, 4.0], [1.0, 2.0, 4.0])
    assert got["median"] == 1.5
    assert got["min"] == 1.0 and got["max"] == 2.0
    assert got["rounds_for_5pct"] > 0
    one = bench.paired_ratio([2.0], [1.0])
    assert one["median"] == 2.0 and math.isnan(one["rounds_for_5pct"])


def test_paired_ratio_is_nan_when_a_path_cannot_have_the_metric() -> None:
    assert all(math.isnan(v) for v in bench.paired_ratio([], [1.0, 2.0]).values())
    assert not math.isnan(bench.paired_ratio([1.0, 2.0], [1.0, 2.0])["median"])


def test_sockperf_is_left_out_of_the_ipv6_paths_only() -> None:
    assert not bench.metric_applies("overlay6", "rr_p50_us")
    assert bench.metric_applies("overlay", "rr_p50_us")
    assert bench.metric_applies("overlay6", "rr_py_p50_us")
    assert bench.metric_applies("overlay6", "tcp1_fwd")


def test_every_path_takes_every_place_over_the_rounds() -> None:
    paths = bench.paths_for("dual")
    orders = [bench.rotated(paths, n) for n in range(len(paths))]
    assert orders[0] == paths
    for place in range(len(paths)):
        assert {order[place] for order in orders} == set(paths)
    assert bench.rotated(paths, len(paths)) == paths


def _raw(paths: tuple[str, ...], rounds: int) -> dict[str, object]:
    samples = {
        p: {
            m: [] if not bench.metric_applies(p, m) else [float(i + 1 + n) for n in range(rounds)]
            for m, _, _ in bench.METRICS
        }
        for i, p in enumerate(paths)
    }
    return {"samples": samples, "steal_pct": [0.5] * rounds}


def test_summary_and_report_of_a_dual_run() -> None:
    paths = bench.paths_for("dual")
    summary = bench.summarise(_raw(paths, 3), "dual")
    ratios = summary["ratios"]
    assert isinstance(ratios, dict)
    assert {"overlay6/overlay", "routed6/routed", "overlay/routed"} <= set(ratios)
    # overlay is path 2 (3, 4, 5), overlay6 path 6 (7, 8, 9): 7/3, 8/4, 9/5.
    assert ratios["overlay6/overlay"]["tcp1_fwd"]["median"] == 2.0
    assert math.isnan(ratios["overlay6/overlay"]["rr_p50_us"]["median"])
    mtu = dict.fromkeys(paths, 1500) | {"overlay": 1430, "overlay6": 1430, "flannel": 1430}
    mtu["flannel6"] = 1430
    meta = {
        "date": "2026-12-02",
        "machine": "x86_64",
        "congestion": "cubic",
        "rounds": 3,
        "seconds": 3.0,
        "steal": "0.5 to 0.5 %",
        "families": "dual",
        "mtu": mtu,
    }
    text = bench.markdown(summary, meta)
    assert (
        "| MTU (sender's interface) | 1500 | 1500 | 1430 | 1430 | 1500 | 1500 | 1430 | 1430 |"
        in text
    )
    assert "congestion control cubic" in text
    assert "IPv6 over IPv4" in text and "overlay6/overlay" in text
    assert "1430 for both families" in text and "less 70" in text
    assert "n/a" in text  # sockperf's cells on the IPv6 paths
    assert bench.svg_chart(summary, "t").startswith("<svg")


def test_an_ipv4_run_reports_as_before() -> None:
    paths = bench.paths_for("v4")
    summary = bench.summarise(_raw(paths, 2), "v4")
    meta = {
        "date": "d",
        "machine": "m",
        "congestion": "cubic",
        "rounds": 2,
        "seconds": 3.0,
        "steal": "s",
        "families": "v4",
        "mtu": {"underlay": 1500, "routed": 1500, "overlay": 1450, "flannel": 1450},
    }
    text = bench.markdown(summary, meta)
    assert "overlay6" not in text and "IPv6" not in text
    assert "| metric | underlay | routed | overlay | flannel |" in text
    assert "n/a" not in text.split("Rounds needed")[0]


def test_mtu_note_says_what_the_dual_stack_mtu_does_to_the_ipv4_figures() -> None:
    dual = bench.mtu_note({"underlay": 1500, "overlay": 1430, "overlay6": 1430})
    assert "1430 for both families" in dual and "1500 less 70" in dual
    assert "less 50" in bench.mtu_note({"underlay": 1500, "overlay": 1450})


def test_bench_arguments() -> None:
    args = ctl.parser().parse_args(["lab", "bench"])
    assert args.families == "dual" and args.congestion == "cubic" and args.rounds == 10
    args = ctl.parser().parse_args(["lab", "bench", "--families", "v4", "--rounds", "12"])
    assert args.families == "v4" and args.rounds == 12
    with pytest.raises(SystemExit):
        ctl.parser().parse_args(["lab", "bench", "--families", "v6"])


# --- lab converge -------------------------------------------------------------


def test_lease_keys_give_both_subnets() -> None:
    key = "/coreos.com/network/subnets/10.244.35.0-24&fd00:10:244:b2::-64"
    assert converge.parse_lease_key(key) == (
        IPv4Network("10.244.35.0/24"),
        IPv6Network("fd00:10:244:b2::/64"),
    )
    assert converge.parse_lease_key("10.244.1.0-24") == (IPv4Network("10.244.1.0/24"), None)
    assert converge.gateway(IPv4Network("10.244.35.0/24")) == IPv4Address("10.244.35.1")
    assert converge.gateway(IPv6Network("fd00:10:244:b2::/64")) == IPv6Address("fd00:10:244:b2::1")


def _round(offset: float) -> converge.Round:
    # Lease at 10 + offset; each later moment a fixed step after it.
    lease = 10.0 + offset
    return converge.Round(
        started=lease - 0.6,
        lease=lease,
        ready=lease + 0.15,
        container=lease + 0.5,
        gateway={4: lease + 0.14, 6: lease + 0.16},
        reached={
            (4, "to_new"): lease + 0.51,
            (4, "from_new"): lease + 0.52,
            (6, "to_new"): lease + 0.55,
            (6, "from_new"): lease + 0.53,
        },
    )


def test_a_family_is_reached_when_both_directions_are() -> None:
    f = _round(0).figures()
    assert f["containers_v4"] == pytest.approx(0.52)  # the later direction
    assert f["containers_v6"] == pytest.approx(0.55)
    assert f["containers_both"] == pytest.approx(0.55)
    assert f["attached_to_both"] == pytest.approx(0.05)
    assert f["start_to_lease"] == pytest.approx(0.6)
    assert f["gateway_v6"] == pytest.approx(0.16)
    assert set(f) == {key for key, _ in converge.FIGURES}


def test_the_converge_table_has_p50_p99_and_max_per_figure() -> None:
    summary = converge.Summary([_round(n) for n in range(20)])
    table = summary.table()
    assert table[0] == "| from the lease in etcd to | p50 | p99 | max | min |"
    both = next(line for line in table if "both families |" in line)
    assert both.split(" | ")[1:] == ["550 ms", "550 ms", "550 ms", "550 ms |"]
    assert len(table) == 2 + len(converge.FIGURES)


def test_p99_names_its_sample() -> None:
    assert converge._rank_name(20) == "largest"
    assert converge._rank_name(200) == "198th smallest of 200"


def test_converge_arguments() -> None:
    assert ctl.parser().parse_args(["lab", "converge"]).rounds == 20
    args = ctl.parser().parse_args(["lab", "converge", "--rounds", "30", "--name", "x"])
    assert args.rounds == 30 and args.name == "x"


# --- lab cpbench: a dual run is dual -------------------------------------------

LOG = (
    "ts=1 level=info logger=overlayd event=underlay iface=eth0 address=192.0.2.11"
    " address6=2001:db8::11 mtu=1500\n"
    "ts=2 level=info logger=overlayd.daemon.leasing event=lease_acquired"
    " subnet=10.128.1.0/24 key=/coreos.com/network/subnets/10.128.1.0-24&fd00:128::-64 ttl=60\n"
)


def test_a_dual_run_needs_an_ipv6_underlay_address_and_an_ipv6_lease() -> None:
    assert cpbench.check_dual(LOG) == "2001:db8::11"  # the positive control
    no_address6 = LOG.replace("address6=2001:db8::11", "address6=None")
    with pytest.raises(RuntimeError, match="address6"):
        cpbench.check_dual(no_address6)
    v4_lease = LOG.replace("&fd00:128::-64", "")
    with pytest.raises(RuntimeError, match="no IPv6 subnet"):
        cpbench.check_dual(v4_lease)


def test_the_last_run_in_an_appended_log_counts() -> None:
    earlier = LOG.replace("address6=2001:db8::11", "address6=None")
    assert cpbench.logged_underlay6(earlier + LOG) == "2001:db8::11"
    assert cpbench.logged_underlay6(LOG + earlier) is None


# --- overlayd.lab.rr ------------------------------------------------------------


def test_rr_refuses_unknown_usage() -> None:
    assert rr.main([]) == 2
    assert rr.main(["ping", "192.0.2.1"]) == 2


def test_each_family_route_is_summarised_alone() -> None:
    # Three dual changes: IPv4 route times, then IPv6 route times.
    changes = [[0.010, 0.040], [0.020, 0.050], [0.030, 0.090]]
    found = cpbench.per_family(changes)
    assert found["IPv4"] == (0.020, 0.030)
    assert found["IPv6"] == (0.050, 0.090)
    assert list(cpbench.per_family([[0.01], [0.02]])) == ["IPv4"]


def test_cpbench_rounds_report_the_median_of_their_ratios_and_skip_a_zero_baseline() -> None:
    def result(scale: float, idle: float) -> cpbench.CpResult:
        return cpbench.CpResult(
            family="v4",
            peers=5000,
            cold_start=2.0 * scale,
            add_p50=0.010 * scale,
            add_p99=0.020 * scale,
            remove_p50=0.005 * scale,
            remove_p99=0.010 * scale,
            peak_rss_mb=100.0,
            idle_cpu_pct=idle,
        )

    base = result(1.0, 0.0)  # no idle CPU measured: that ratio is n/a, not infinite
    rounds = [cpbench.ratios(result(s, 0.1), base) for s in (1.2, 3.0, 1.4)]
    assert rounds[0][1] == pytest.approx(1.2)
    row = cpbench.median_ratio_row(5000, rounds)
    assert (
        row
        == "| median of 3 |   5000 |  1.40x |  1.40x |  1.40x |  1.40x |  1.40x |  1.00x |   n/a |"
    )


# --- lab svcchurn ---------------------------------------------------------------------


def test_svcchurn_shares_the_cycles_among_workers_and_counts_disagreements() -> None:
    from overlayd.lab import svcchurn

    assert svcchurn.split(1000, 3) == [334, 333, 333]
    assert svcchurn.split(2, 3) == [1, 1, 0]
    result = svcchurn.ChurnResult((1, 2), 10, seconds=5.0, converge_seconds=0.5, revision=9)
    result.findings = {
        1: [{"check": "services", "ok": True, "detail": "fine", "count": 1}],
        2: [
            {"check": "services table", "ok": False, "detail": "map vips_v4: ...", "count": 1},
            {"check": "services table", "ok": False, "detail": "and 4 more", "count": 4},
        ],
    }
    result.names = {1: [], 2: ["churn-h1-w0-3.overlay.internal. A at ...: NOERROR 10.244.1.9"]}
    assert result.disagreements == 6
    shown = "\n".join(svcchurn.lines(result, 1))
    assert "cycles: 10 in 5.0 s (2.00 a second), 0 failed" in shown
    assert "h2 FAIL services table: map vips_v4: ..." in shown
    assert "    h2 1 differ\n      churn-h1-w0-3.overlay.internal. A at" in shown
    assert shown.endswith("disagreements: 6")
    args = ctl.parser().parse_args(["lab", "svcchurn", "--cycles", "20"])
    assert (args.cycles, args.workers) == (20, 1)
