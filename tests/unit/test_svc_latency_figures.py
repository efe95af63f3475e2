"""The pure parts of `lab svcbench --latency`: percentiles of connect
times, the paired ratio of the largest size over the smallest, the
summary table, the connect client's targets and the services table it
loads. No namespace is made and nothing is timed here."""

from __future__ import annotations

import pytest

from overlayd.cli import ctl
from overlayd.lab import conntime, svclatency
from overlayd.lab.svclatency import Sample


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert svclatency.percentile(values, 50) == 50
    assert svclatency.percentile(values, 99) == 99
    assert svclatency.percentile([7], 99) == 7


def test_a_sample_turns_connect_times_in_ns_into_us() -> None:
    s = Sample.of(0, 100, [40_000] * 98 + [90_000, 200_000], [30_000] * 100)
    assert (s.vip_p50, s.vip_p99, s.direct_p50, s.direct_p99) == (40.0, 90.0, 30.0, 30.0)


def _samples() -> list[Sample]:
    # Round by round, VIP p50 at 10,000 over 100: 44/40 = 1.1, 60/50 = 1.2, 30/30 = 1.0.
    rows = [(0, 40, 44), (1, 50, 60), (2, 30, 30)]
    out = []
    for r, small, large in rows:
        out.append(Sample(r, 100, small, small * 2, 20, 40))
        out.append(Sample(r, 10_000, large, large * 2, 20, 40))
    return out


def test_the_size_ratio_is_paired_within_each_round() -> None:
    ratios = svclatency.paired(_samples(), "vip_p50", 10_000, 100)
    assert ratios == pytest.approx([1.1, 1.2, 1.0])
    # Not median(large)/median(small) = 44/40: the pairing keeps round noise out.
    assert svclatency.paired(_samples(), "direct_p50", 10_000, 100) == [1.0, 1.0, 1.0]


def test_a_round_missing_a_size_is_left_out_of_the_pairing() -> None:
    samples = [*_samples(), Sample(3, 100, 10, 20, 10, 20)]
    assert len(svclatency.paired(samples, "vip_p50", 10_000, 100)) == 3


def test_the_summary_gives_each_size_over_rounds_and_the_paired_ratio() -> None:
    lines = svclatency.summary(_samples(), [100, 10_000])
    assert "| 100 | 40 (30 to 50) | 80 (60 to 100) | 20 (20 to 20) |" in lines[2]
    vip = next(line for line in lines if line.startswith("VIP p50"))
    assert "10000 over 100 services, paired by round: 1.100 (1.000 to 1.200)" in vip
    assert vip.endswith("rounds: 1.100, 1.200, 1.000")
    # One size only: no ratio to give.
    assert not any("over" in line for line in svclatency.summary(_samples()[:1], [100]))


def test_conntime_targets_are_host_and_port_and_refuse_anything_else() -> None:
    assert conntime.parse_target("10.96.0.10:80") == ("10.96.0.10", 80)
    with pytest.raises(ValueError, match="HOST:PORT"):
        conntime.parse_target("10.96.0.10")


def test_the_latency_table_holds_the_synthetic_services_and_the_real_one() -> None:
    text = svclatency.table_script(3)
    assert f"{svclatency.VIP} . tcp . 80" in text
    assert "10.97.0.2 . tcp . 80" in text  # the third synthetic service
    assert "10.97.0.3 . tcp . 80" not in text  # and no fourth


def test_latency_mode_is_an_option_of_svcbench_with_its_defaults() -> None:
    args = ctl.parser().parse_args(["lab", "svcbench", "--latency"])
    assert (args.latency, args.services, args.rounds, args.connects) == (
        True,
        [100, 10_000],
        5,
        500,
    )
    assert not ctl.parser().parse_args(["lab", "svcbench"]).latency


def test_the_vip_against_direct_ratio_is_paired_by_round_too() -> None:
    # Direct 20 µs throughout: VIP/direct 2.0 -> 2.2, 2.5 -> 3.0, 1.5 -> 1.5.
    ratios = svclatency.paired(_samples(), "vip_over_direct", 10_000, 100)
    assert ratios == pytest.approx([1.1, 1.2, 1.0])
    line = next(x for x in svclatency.summary(_samples(), [100, 10_000]) if "over direct" in x)
    assert "paired by round: 1.100 (1.000 to 1.200)" in line
