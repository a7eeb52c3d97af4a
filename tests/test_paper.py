"""Table 1 over a population: where the study's single figure falls among the members."""

import numpy as np
import pytest

from compax.paper import seed_distribution
from compax.report import table1_seeds


def test_seed_distribution_against_numpy_and_a_hand_count():
    values = np.arange(1.0, 11.0)  # 1, 2, ..., 10
    d = seed_distribution(values, 3.0)
    assert d["mean"] == 5.5 and d["std"] == pytest.approx(np.std(values, ddof=1))
    assert (d["low"], d["high"]) == pytest.approx((1.225, 9.775))  # numpy's linear percentiles
    assert d["percentile"] == pytest.approx(25.0)  # 2 below, 1 tie counted half: 2.5 of 10
    assert seed_distribution(values, 0.5)["percentile"] == 0.0
    assert seed_distribution(values, None)["percentile"] is None
    assert seed_distribution([1.0, 2.0], 1.5) is None  # too few members


def test_table1_over_members_uses_each_members_own_difference():
    base = [0.90, 0.92, 0.91, 0.89]
    results = {"model": {"name": "lenet5"}, "dataset": {"name": "gtsrb"}, "variants": {
        "baseline": {"member_accuracy": base},
        "w8a8": {"member_accuracy": [0.899, 0.918, 0.911, 0.887]}}}
    rows = {row[0]: row for row in table1_seeds(results).rows}
    deltas = 100 * (np.array(results["variants"]["w8a8"]["member_accuracy"]) - np.array(base))
    assert rows["w8a8 Δ pp"][1] == f"{deltas.mean():+.2f}"
    assert rows["w8a8 Δ pp"][4] == "-0.2"  # the study's GTSRB LeNet-5 w8a8
    assert rows["w8a8 Δ pp"][5] == f"{(np.sum(deltas < -0.2) + 0.5 * np.sum(deltas == -0.2)) * 25:.0f}"
    assert rows["accuracy %"][1] == f"{100 * np.mean(base):.2f}"
    assert table1_seeds({**results, "variants": {"baseline": {"member_accuracy": base[:2]}}}) is None
