"""fnn.metrics.calibration against a direct per-sample count, and its refusals."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fnn import metrics


def _reference(p, y, bins):
    """NLL, ECE and accuracy by walking the samples one by one into their bins."""
    count, hits, conf = [0] * bins, [0.0] * bins, [0.0] * bins
    nll = 0.0
    for row, label in zip(p, y):
        c = max(row)
        b = next(i for i in range(bins) if c <= (i + 1) / bins)  # the bin ((i)/B, (i+1)/B]
        count[b] += 1
        hits[b] += float(list(row).index(c) == label)
        conf[b] += c
        nll -= math.log(row[label])
    m = len(y)
    ece = sum(abs(h - c) / m for n, h, c in zip(count, hits, conf) if n)
    return nll / m, ece, sum(hits) / m


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(2, 6), bins=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_calibration_against_a_per_sample_count(m, k, bins, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (m, k))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = rng.integers(0, k, m)
    got = metrics.calibration(p, y, bins=bins)
    nll, ece, acc = _reference(p.tolist(), y.tolist(), bins)
    assert got["nll"] == pytest.approx(nll, rel=1e-12)
    assert got["ece"] == pytest.approx(ece, rel=1e-9, abs=1e-15)
    assert got["accuracy"] == pytest.approx(acc)
    assert got["confidence"] == pytest.approx(p.max(1).mean())
    assert got["bins"] == bins


def test_calibration_of_known_cases():
    # always right with confidence 1: no error; always 0.9 confident and right 9 times in 10: no error
    assert metrics.calibration(np.eye(3)[[0, 1, 2]], np.array([0, 1, 2]))["ece"] == 0.0
    p = np.tile([0.9, 0.1], (10, 1))
    y = np.array([0] * 9 + [1])
    assert metrics.calibration(p, y, bins=10)["ece"] == pytest.approx(0.0, abs=1e-15)
    # 0.9 confident, right half the time: error 0.4
    assert metrics.calibration(p, np.array([0, 1] * 5), bins=10)["ece"] == pytest.approx(0.4)
    # two bins weighed by their share: 4 rows at 0.9 right half the time (gap 0.4), 6 at 0.7 always right (0.3)
    p2 = np.array([[0.9, 0.1]] * 4 + [[0.7, 0.3]] * 6)
    y2 = np.array([0, 1, 0, 1] + [0] * 6)
    assert metrics.calibration(p2, y2, bins=10)["ece"] == pytest.approx(0.4 * 0.4 + 0.6 * 0.3)
    # a binary task given as the positive class's probability equals its two-column form
    q = np.array([0.2, 0.7, 0.95])
    yb = np.array([0, 1, 0])
    assert metrics.calibration(q, yb) == metrics.calibration(np.stack([1 - q, q], 1), yb)


@pytest.mark.parametrize("probs, labels, match", [
    (np.zeros((0, 3)), np.zeros(0, int), "M > 0"),
    (np.full((2, 3), 1 / 3), np.array([0.0, 1.0]), "integers"),
    (np.full((2, 3), 1 / 3), np.array([0, 1, 2]), r"\(2,\) integers"),
    (np.full((2, 3), 1 / 3), np.array([0, 3]), "0..2"),
    (np.array([[2.0, -1.0], [0.5, 0.5]]), np.array([0, 1]), "not logits"),
    (np.full((2, 2), np.nan), np.array([0, 1]), "finite"),
    (np.full((2, 3, 1), 1 / 3), np.array([0, 1]), "shape"),
])
def test_calibration_refuses_bad_input(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics.calibration(probs, labels)
    with pytest.raises(ValueError, match="bins"):
        metrics.calibration(np.full((2, 2), 0.5), np.array([0, 1]), bins=0)
