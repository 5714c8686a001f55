"""The A/B benchmark's statistics (benchmarks/step_ab.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "step_ab.py"
_spec = importlib.util.spec_from_file_location("step_ab", _PATH)
assert _spec is not None and _spec.loader is not None
step_ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_ab)


def test_a_consistent_slowdown_is_measured_and_significant() -> None:
    before = [0.30, 0.36, 0.31, 0.40, 0.33, 0.35, 0.32, 0.38, 0.34, 0.37]
    # 10% slower in every round, under noise four times as large as the change between rounds.
    after = [round(value * 1.10, 6) for value in before]
    result = step_ab.compare_rounds(before, after)
    assert result["after_over_before"] == pytest.approx(1.10, rel=1e-6)
    assert result["before_s_per_step"] == pytest.approx(0.345)
    # Ten positive paired differences: the exact two-sided signed-rank P is 2 / 2**10.
    assert result["wilcoxon_p"] == pytest.approx(2 / 2**10)


def test_no_difference_gives_ratio_one_and_p_one() -> None:
    rounds = [0.5, 0.6, 0.55]
    result = step_ab.compare_rounds(rounds, list(rounds))
    assert result["after_over_before"] == 1.0
    assert result["wilcoxon_p"] == 1.0


def test_mixed_differences_are_not_significant() -> None:
    before = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    after = [1.01, 0.99, 1.02, 0.98, 1.03, 0.97]
    result = step_ab.compare_rounds(before, after)
    assert result["wilcoxon_p"] > 0.5


def test_unpaired_rounds_are_refused() -> None:
    with pytest.raises(ValueError, match="same number"):
        step_ab.compare_rounds([1.0, 1.0], [1.0])
