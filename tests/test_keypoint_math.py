"""Keypoint metric math against hand-computed cases and a plain-Python second implementation."""
import math

import numpy as np
import pytest
import torch

from handforge.errors import HandforgeError
from handforge.keypoint_math import (auc, bbox_size_px, epe, keypoint_errors_px,
                                                      keypoint_report, pck)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- a second implementation: plain Python loops over samples and joints ---------------------------


def reference_errors(pred, target, height, width):
    return [[math.hypot((p[0] - t[0]) * width, (p[1] - t[1]) * height) for p, t in zip(ps, ts)]
            for ps, ts in zip(pred, target)]


def reference_pck(errors, visible, thresholds):
    """MMPose: per joint, the fraction of its visible samples below the threshold; then the mean
    over joints that have any visible sample."""
    per_joint = []
    for k in range(len(errors[0])):
        rows = [i for i in range(len(errors)) if visible[i][k]]
        if rows:
            per_joint.append(sum(errors[i][k] < thresholds[i] for i in rows) / len(rows))
    return sum(per_joint) / len(per_joint) if per_joint else math.nan


def reference_bbox(target, visible, height, width):
    sides = []
    for ts, vs in zip(target, visible):
        xs = [t[0] * width for t, v in zip(ts, vs) if v]
        ys = [t[1] * height for t, v in zip(ts, vs) if v]
        sides.append(max(max(xs) - min(xs), max(ys) - min(ys)) if xs else 0.0)
    return sides


def reference_report(pred, target, visible, height, width):
    errors = reference_errors(pred, target, height, width)
    n = len(errors)
    boxes = reference_bbox(target, visible, height, width)
    in_box = [[v and boxes[i] > 0 for v in visible[i]] for i in range(n)]
    flat = [e for es, vs in zip(errors, visible) for e, v in zip(es, vs) if v]
    return {
        "pck@0.05": reference_pck(errors, visible, [0.05 * max(height, width)] * n),
        "pck@0.2bbox": reference_pck(errors, in_box, [0.2 * b for b in boxes]),
        "auc@30px": sum(reference_pck(errors, visible, [30 * i / 20] * n) for i in range(20)) / 20,
        "epe_px": sum(flat) / len(flat) if flat else math.nan,
    }


# -- hand-computed cases ----------------------------------------------------------------------------


def test_errors_are_pixel_distances():
    target = torch.tensor([[[0.5, 0.5], [0.0, 0.0]]], dtype=torch.float64)
    pred = torch.tensor([[[0.5 + 3 / 100, 0.5 + 4 / 50], [0.01, 0.0]]], dtype=torch.float64)  # 3 px right, 4 down; 1 px
    errors = keypoint_errors_px(pred, target, (50, 100))  # height 50, width 100
    torch.testing.assert_close(errors, torch.tensor([[5.0, 1.0]], dtype=torch.float64))
    # Extra columns (visibility) are ignored; an int size means a square image.
    with_vis = torch.cat([target, torch.ones(1, 2, 1, dtype=torch.float64)], -1)
    torch.testing.assert_close(keypoint_errors_px(with_vis, with_vis, 64), torch.zeros(1, 2, dtype=torch.float64))


def test_pck_hand_computed():
    errors = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.5, 9.0]])
    visible = torch.tensor([[True, True, False], [True, True, True]])
    # Joint 0: 1 < 2.5 yes, 3 no -> 1/2; joint 1: 5 no, 0.5 yes -> 1/2; joint 2: only 9 -> 0.
    assert pck(errors, visible, 2.5) == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    # Strictly below: an error equal to the threshold is a miss (MMPose).
    assert pck(errors, visible, 3.0) == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    # Per-sample thresholds: sample 0 at 10 px (all its visible joints right), sample 1 at 1 px.
    assert pck(errors, visible, torch.tensor([10.0, 1.0])) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    # Per-joint mean, not pooled: the pooled fraction would be 2/5 at 2.5 px.
    assert pck(errors, visible, 2.5) != pytest.approx(2 / 5)
    # A joint never visible is left out of the mean, not counted as 0.
    visible[:, 2] = False
    assert pck(errors, visible, 2.5) == pytest.approx(0.5)


def test_epe_and_bbox_hand_computed():
    errors = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.5, 9.0]])
    visible = torch.tensor([[True, True, False], [True, True, True]])
    assert epe(errors, visible) == pytest.approx((1 + 5 + 3 + 0.5 + 9) / 5)
    target = torch.tensor([[[0.1, 0.2], [0.5, 0.3], [0.9, 0.9]],
                           [[0.2, 0.2], [0.2, 0.6], [0.3, 0.3]],
                           [[0.4, 0.4], [0.7, 0.7], [0.1, 0.1]]])
    vis = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    # Sample 0: x 10..50, y 40..60 of a (200, 100) image -> 40; sample 1: x 20..30, y 40..120 -> 80;
    # sample 2: one point -> 0.
    torch.testing.assert_close(bbox_size_px(target, vis, (200, 100)),
                               torch.tensor([40.0, 80.0, 0.0], dtype=torch.float64))
    assert bbox_size_px(target, torch.zeros(3, 3, dtype=torch.bool), 64).tolist() == [0.0, 0.0, 0.0]


def test_auc_follows_mmpose_thresholds():
    # One joint with error e: PCK at threshold t is [e < t]; thresholds 0, 1.5, ..., 28.5 px.
    for e, passed in [(0.0, 19), (1.0, 19), (1.5, 18), (10.0, 13), (28.4, 1), (28.5, 0), (40.0, 0)]:
        errors, visible = torch.tensor([[e]]), torch.tensor([[True]])
        assert auc(errors, visible) == pytest.approx(passed / 20), e
    # Thresholds scale with max_px and steps: 0, 5 with (10 px, 2 steps).
    assert auc(torch.tensor([[4.0]]), torch.tensor([[True]]), max_px=10, steps=2) == pytest.approx(0.5)


def test_report_matches_plain_python_with_partial_visibility():
    rng = np.random.default_rng(0)
    n, k, height, width = 40, 21, 96, 128
    target = rng.uniform(0.1, 0.9, (n, k, 2))
    pred = target + rng.normal(0, 0.04, (n, k, 2))
    visible = rng.uniform(size=(n, k)) < 0.8
    visible[3] = False  # a sample with nothing visible
    visible[5] = False
    visible[5, 7] = True  # and one with a single point: empty box, left out of pck@0.2bbox
    visible[:, 4] = False  # a joint never visible
    report = keypoint_report(torch.tensor(pred, dtype=torch.float32), torch.tensor(target, dtype=torch.float32),
                             torch.tensor(visible), (height, width))
    # The reference gets the same float32-rounded coordinates the tensors hold.
    pred32, target32 = pred.astype(np.float32).tolist(), target.astype(np.float32).tolist()
    expected = reference_report(pred32, target32, visible.tolist(), height, width)
    assert report.keys() == expected.keys()
    for name in expected:
        assert report[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-12), name
    assert 0 < report["pck@0.05"] < 1 and 0 < report["auc@30px"] < 1  # informative, not degenerate


def test_perfect_and_empty_predictions():
    target = torch.rand(4, 21, 3)
    visible = torch.ones(4, 21, dtype=torch.bool)
    perfect = keypoint_report(target, target, visible, 128)
    # AUC's first threshold is 0 px, where nothing is strictly below: a perfect model gets 19/20.
    assert perfect == pytest.approx({"pck@0.05": 1.0, "pck@0.2bbox": 1.0, "auc@30px": 0.95, "epe_px": 0.0})
    empty = keypoint_report(target, target, torch.zeros(4, 21, dtype=torch.bool), 128)
    assert all(math.isnan(v) for v in empty.values())


def test_bad_shapes_are_named():
    with pytest.raises(HandforgeError, match=r"keypoint metrics: pred must be \(N, K, 2\)"):
        keypoint_errors_px(torch.zeros(3, 2), torch.zeros(3, 1, 2), 64)
    with pytest.raises(HandforgeError, match="different numbers of samples or joints"):
        keypoint_errors_px(torch.zeros(2, 21, 2), torch.zeros(2, 20, 2), 64)
    with pytest.raises(HandforgeError, match=r"must both be \(N, K\)"):
        pck(torch.zeros(2, 21), torch.ones(2, 20, dtype=torch.bool), 1.0)
    with pytest.raises(HandforgeError, match="3 thresholds for 2 samples"):
        pck(torch.zeros(2, 21), torch.ones(2, 21, dtype=torch.bool), torch.ones(3))
