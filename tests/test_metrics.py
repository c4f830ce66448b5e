"""Tests for benchmark.metrics: continual-learning summaries of a recall matrix."""

import math
import random

import numpy as np
import pytest

from benchmark.metrics import (
    METRICS,
    MissingCellError,
    average_incremental,
    backward_transfer,
    final_average,
    forgetting,
    last_forgetting,
    forward_transfer,
    lpi_average_over_history,
    lpi_signed_forgetting,
    rsum,
    summarize,
)

# ----------------------------------------------------------------------------------------
# Hand-computed 3 x 3 example (rows: after session t, columns: task j). R[1][0] = 88 is
# above the diagonal value 80, so max-based forgetting differs from -BWT.
# ----------------------------------------------------------------------------------------
R3 = [
    [80.0, 10.0, 5.0],
    [88.0, 85.0, 20.0],
    [60.0, 75.0, 90.0],
]
R3_INIT = [50.0, 8.0, 4.0]
R3_EXPECTED = {
    # (60 + 75 + 90) / 3
    "final_average": 75.0,
    # (80 + (88 + 85)/2 + (60 + 75 + 90)/3) / 3 = (80 + 86.5 + 75) / 3
    "average_incremental": 80.5,
    # ((60 - 80) + (75 - 85)) / 2
    "backward_transfer": -15.0,
    # ((max(80, 88) - 60) + (85 - 75)) / 2 = (28 + 10) / 2
    "forgetting_max": 19.0,
    # Avalanche's, from the value just after learning: ((80 - 60) + (85 - 75)) / 2
    "forgetting_last": 15.0,
    # ((R[0][1] - 8) + (R[1][2] - 4)) / 2 = ((10 - 8) + (20 - 4)) / 2 = (2 + 16) / 2
    "forward_transfer": 9.0,
    # column means over history: task 0 (80+88+60)/3 = 76, task 1 (85+75)/2 = 80,
    # task 2 90/1 = 90; then (76 + 80 + 90) / 3
    "lpi_average_over_history": 82.0,
    # ((60 - max(80, 88)) + (75 - 85)) / 2 = (-28 - 10) / 2
    "lpi_signed_forgetting": -19.0,
}

FUNCTIONS = {
    "final_average": final_average,
    "average_incremental": average_incremental,
    "backward_transfer": backward_transfer,
    "forgetting_max": forgetting,
    "forgetting_last": last_forgetting,
    "lpi_average_over_history": lpi_average_over_history,
    "lpi_signed_forgetting": lpi_signed_forgetting,
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_hand_computed_3x3(name):
    assert FUNCTIONS[name](R3) == pytest.approx(R3_EXPECTED[name])


def test_hand_computed_forward_transfer():
    assert forward_transfer(R3, R3_INIT) == pytest.approx(9.0)


def test_accepts_numpy_arrays():
    assert final_average(np.array(R3)) == pytest.approx(75.0)
    assert forward_transfer(np.array(R3), np.array(R3_INIT)) == pytest.approx(9.0)


# ----------------------------------------------------------------------------------------
# Hand-computed 4 x 4 with only the seen tasks evaluated (upper triangle None), as a run
# with tasks "seen" stores it.
# ----------------------------------------------------------------------------------------
R4_SEEN = [
    [40.0, None, None, None],
    [30.0, 50.0, None, None],
    [35.0, 45.0, 60.0, None],
    [20.0, 48.0, 55.0, 70.0],
]


def test_hand_computed_4x4_lower_triangle():
    # (20 + 48 + 55 + 70) / 4 = 193 / 4
    assert final_average(R4_SEEN) == pytest.approx(48.25)
    # (40 + (30+50)/2 + (35+45+60)/3 + 193/4) / 4 = (40 + 40 + 46.6667 + 48.25) / 4
    assert average_incremental(R4_SEEN) == pytest.approx((40 + 40 + 140 / 3 + 48.25) / 4)
    # ((20-40) + (48-50) + (55-60)) / 3 = -27 / 3
    assert backward_transfer(R4_SEEN) == pytest.approx(-9.0)
    # task 0: max(40, 30, 35) - 20 = 20; task 1: max(50, 45) - 48 = 2; task 2: 60 - 55 = 5
    assert forgetting(R4_SEEN) == pytest.approx(27 / 3)
    assert lpi_signed_forgetting(R4_SEEN) == pytest.approx(-27 / 3)
    # columns: (40+30+35+20)/4 = 31.25, (50+45+48)/3 = 47.6667, (60+55)/2 = 57.5, 70
    assert lpi_average_over_history(R4_SEEN) == pytest.approx((31.25 + 143 / 3 + 57.5 + 70) / 4)


# ----------------------------------------------------------------------------------------
# Independent reference implementations: straightforward loops over Python lists.
# ----------------------------------------------------------------------------------------


def ref_final(R):
    T = len(R)
    return sum(R[T - 1][j] for j in range(T)) / T


def ref_incremental(R):
    T = len(R)
    total = 0.0
    for t in range(T):
        seen = [R[t][j] for j in range(t + 1)]
        total += sum(seen) / len(seen)
    return total / T


def ref_bwt(R):
    T = len(R)
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def ref_forgetting(R):
    T = len(R)
    total = 0.0
    for j in range(T - 1):
        best = R[j][j]
        for s in range(j + 1, T - 1):
            if R[s][j] > best:
                best = R[s][j]
        total += best - R[T - 1][j]
    return total / (T - 1)


def ref_fwt(R, init):
    T = len(R)
    return sum(R[j - 1][j] - init[j] for j in range(1, T)) / (T - 1)


def ref_lpi_average(R):
    T = len(R)
    total = 0.0
    for j in range(T):
        history = [R[s][j] for s in range(j, T)]
        total += sum(history) / len(history)
    return total / T


def ref_lpi_forgetting(R):
    return -ref_forgetting(R)


def random_matrix(rng, T, upper):
    return [[round(rng.uniform(0, 100), 2) if (j <= t or upper) else None for j in range(T)] for t in range(T)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_matches_loop_reference(seed, T):
    rng = random.Random(seed * 100 + T)
    lower = random_matrix(rng, T, upper=False)
    full = random_matrix(rng, T, upper=True)
    init = [round(rng.uniform(0, 100), 2) for _ in range(T)]
    for R in (lower, full):
        assert final_average(R) == pytest.approx(ref_final(R))
        assert average_incremental(R) == pytest.approx(ref_incremental(R))
        assert backward_transfer(R) == pytest.approx(ref_bwt(R))
        assert forgetting(R) == pytest.approx(ref_forgetting(R))
        assert lpi_average_over_history(R) == pytest.approx(ref_lpi_average(R))
        assert lpi_signed_forgetting(R) == pytest.approx(ref_lpi_forgetting(R))
    assert forward_transfer(full, init) == pytest.approx(ref_fwt(full, init))


# ------------------------------------------------------------------------------ signs


def test_signs_under_pure_forgetting():
    # Each task peaks when learned, then only decays.
    R = [
        [90.0, None, None],
        [80.0, 90.0, None],
        [70.0, 80.0, 90.0],
    ]
    assert backward_transfer(R) < 0
    assert forgetting(R) > 0
    assert lpi_signed_forgetting(R) < 0


def test_signs_under_pure_improvement():
    # Later sessions only help old tasks: no forgetting at all.
    R = [
        [50.0, None, None],
        [60.0, 50.0, None],
        [70.0, 60.0, 50.0],
    ]
    assert backward_transfer(R) > 0
    assert forgetting(R) < 0
    assert lpi_signed_forgetting(R) > 0


def test_forward_transfer_sign():
    R = [[50.0, 30.0], [45.0, 60.0]]
    assert forward_transfer(R, [0.0, 20.0]) == pytest.approx(10.0)  # 30 - 20: helped
    assert forward_transfer(R, [0.0, 40.0]) == pytest.approx(-10.0)  # 30 - 40: hurt


# ------------------------------------------------------------------- missing cells, T == 1


def test_nan_upper_triangle_is_ignored():
    nan = float("nan")
    with_nan = [[row_value if j <= t else nan for j, row_value in enumerate(row)] for t, row in enumerate(R3)]
    with_none = [[row_value if j <= t else None for j, row_value in enumerate(row)] for t, row in enumerate(R3)]
    for R in (with_nan, with_none):
        for name, function in FUNCTIONS.items():
            assert function(R) == pytest.approx(R3_EXPECTED[name]), name


def test_forward_transfer_needs_upper_cells():
    R = [[row_value if j <= t else None for j, row_value in enumerate(row)] for t, row in enumerate(R3)]
    with pytest.raises(ValueError, match=r"t=0, j=1.*'all'"):
        forward_transfer(R, R3_INIT)


def test_forward_transfer_needs_init_values():
    with pytest.raises(ValueError, match=r"R_init\[2\]"):
        forward_transfer(R3, [50.0, 8.0, None])
    with pytest.raises(ValueError, match="one value per task"):
        forward_transfer(R3, [50.0, 8.0])


@pytest.mark.parametrize(
    "function, cell",
    [
        (final_average, (2, 1)),
        (average_incremental, (2, 1)),
        (backward_transfer, (2, 1)),
        (forgetting, (2, 1)),
        (lpi_average_over_history, (2, 1)),
        (lpi_signed_forgetting, (2, 1)),
    ],
)
def test_missing_needed_cell_is_named(function, cell):
    R = [row[:] for row in R3]
    R[cell[0]][cell[1]] = None
    with pytest.raises(MissingCellError, match=rf"t={cell[0]}, j={cell[1]}"):
        function(R)


def test_only_needed_cells_are_checked():
    # final_average reads the last row only; BWT reads the diagonal and the last row only.
    R = [row[:] for row in R3]
    R[1][0] = None  # used by forgetting / average_incremental, not by BWT / final average
    assert final_average(R) == pytest.approx(75.0)
    assert backward_transfer(R) == pytest.approx(-15.0)
    with pytest.raises(ValueError, match="t=1, j=0"):
        forgetting(R)


@pytest.mark.parametrize("R", [[[1.0, 2.0]], [[1.0], [2.0]], [], [1.0, 2.0], [[[1.0]]]])
def test_rejects_non_square(R):
    with pytest.raises(ValueError, match="square"):
        final_average(R)


def test_single_task():
    R = [[42.0]]
    assert final_average(R) == 42.0
    assert average_incremental(R) == 42.0
    assert lpi_average_over_history(R) == 42.0
    assert math.isnan(backward_transfer(R))
    assert math.isnan(forgetting(R))
    assert math.isnan(lpi_signed_forgetting(R))
    assert math.isnan(forward_transfer(R, [10.0]))


# ---------------------------------------------------------------------- registry, summary


def test_registry():
    assert set(METRICS) == set(R3_EXPECTED)
    for name, spec in METRICS.items():
        assert spec.name == name
        assert spec.label and spec.definition
    labels = {name: spec.label for name, spec in METRICS.items()}
    assert labels["backward_transfer"] == "BWT"
    assert labels["forward_transfer"] == "FWT"
    assert labels["lpi_signed_forgetting"] == "LPI forget"
    # Only the two forgettings are "lower is better"; LPI's is signed the other way.
    assert [n for n, s in METRICS.items() if not s.higher_is_better] == ["forgetting_max", "forgetting_last"]
    assert [n for n, s in METRICS.items() if s.needs_init] == ["forward_transfer"]


def test_summarize_full_matrix_with_init():
    assert summarize(R3, R3_INIT) == pytest.approx(R3_EXPECTED)


def test_summarize_skips_fwt_when_it_cannot_be_computed():
    lower = [[v if j <= t else None for j, v in enumerate(row)] for t, row in enumerate(R3)]
    without_fwt = {k: v for k, v in R3_EXPECTED.items() if k != "forward_transfer"}
    assert summarize(R3) == pytest.approx(without_fwt)
    assert summarize(lower, R3_INIT) == pytest.approx(without_fwt)


def test_summarize_still_reports_other_missing_cells():
    R = [row[:] for row in R3]
    R[2][0] = None
    with pytest.raises(ValueError, match="t=2, j=0"):
        summarize(R)


def test_rsum():
    recalls = {"i2t": {1: 30.0, 5: 60.0, 10: 70.0}, "t2i": {1: 20.0, 5: 45.0, 10: 55.5}}
    assert rsum(recalls) == pytest.approx(280.5)  # 160 + 120.5
    as_json = {"i2t": {"1": 30.0, "5": 60.0, "10": 70.0}, "t2i": {"1": 20.0, "5": 45.0, "10": 55.5}}
    assert rsum(as_json) == pytest.approx(280.5)
    with pytest.raises(ValueError, match="t2i"):
        rsum({"i2t": recalls["i2t"]})
    with pytest.raises(ValueError, match="R@10"):
        rsum({"i2t": {1: 1.0, 5: 2.0}, "t2i": recalls["t2i"]})


def test_last_forgetting_is_avalanches_stream_forgetting():
    """Replay the stream through Avalanche's own Forgetting bookkeeping (the metric its
    StreamForgetting averages): after each session the task just trained sets the "initial"
    value, the others the "last" one; at the end average over the keys that have both."""
    from avalanche.evaluation.metrics import Forgetting

    rng = random.Random(3)
    for T in (2, 3, 5):
        R = [[rng.uniform(0, 100) if j <= t else None for j in range(T)] for t in range(T)]
        metric = Forgetting()
        for t in range(T):
            metric.reset_last()  # Avalanche's before_eval
            for j in range(t + 1):
                metric.update(j, R[t][j], initial=(j == t))
        per_task = metric.result()
        assert sorted(per_task) == list(range(T - 1))
        assert last_forgetting(R) == pytest.approx(sum(per_task.values()) / len(per_task))
        assert last_forgetting(R) == pytest.approx(-backward_transfer(R))
        assert forgetting(R) >= last_forgetting(R) - 1e-9
