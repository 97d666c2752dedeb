"""tools/soak.py's drift: the least-squares slope over the run's second half, in MiB per hour."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from soak import drift_per_hour, same_processes  # noqa: E402


def test_drift_is_the_second_halfs_slope_in_mib_per_hour() -> None:
    mib = 2**20
    warm_up = [(float(t), 100.0 * mib * t) for t in range(0, 60, 5)]  # fast growth while warming up: ignored
    steady = [(float(t), 6000.0 * mib + 2.0 * mib * (t - 60) / 3600) for t in range(60, 121, 5)]  # +2 MiB an hour
    assert drift_per_hour(warm_up + steady) == pytest.approx(2.0, rel=1e-6)
    flat = [(float(t), 5.0 * mib) for t in range(0, 100, 5)]
    assert drift_per_hour(flat) == pytest.approx(0.0, abs=1e-9)
    assert drift_per_hour([(0.0, 1.0), (1.0, 2.0)]) is None  # too few samples to say
    assert drift_per_hour([]) is None


def test_a_series_whose_processes_a_swap_replaced_has_no_drift() -> None:
    replaced_early = [(0.0, frozenset({1})), (5.0, frozenset({2})), (10.0, frozenset({2})), (20.0, frozenset({2}))]
    assert same_processes(replaced_early)  # before the second half: warm-up
    assert not same_processes([(0.0, frozenset({1})), (10.0, frozenset({1})), (15.0, frozenset({2}))])
    assert not same_processes([])
