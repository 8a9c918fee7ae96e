"""mIoU as MMSegmentation computes it, on cases worked out by hand."""

import math

import numpy as np
import pytest

from trainer.eval.metrics import IGNORE, IoUAccumulator, reduce_zero_label


def test_ignored_pixels_count_nowhere():
    acc = IoUAccumulator(2)
    pred = np.array([[0, 1], [1, 1]])
    label = np.array([[0, IGNORE], [1, IGNORE]])
    acc.add(pred, label)
    # class 0: I=1, U=1; class 1: I=1, U=1 (the two ignored pixels predicted 1 do not count)
    assert acc.iou().tolist() == [1.0, 1.0]
    assert acc.summary(["a", "b"])["aAcc"] == 1.0


def test_class_absent_from_prediction_and_truth_is_left_out_of_the_mean():
    acc = IoUAccumulator(3)
    acc.add(np.array([[0, 0, 1, 1]]), np.array([[0, 1, 1, 1]]))
    iou = acc.iou()
    # class 0: I=1, U=2 -> 0.5; class 1: I=2, U=3 -> 2/3; class 2: U=0 -> NaN
    assert iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(2 / 3) and math.isnan(iou[2])
    s = acc.summary(["a", "b", "c"])
    assert s["mIoU"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert s["per_class"]["c"] == {"IoU": None, "Acc": None}


def test_class_predicted_but_absent_from_truth_counts_as_zero():
    acc = IoUAccumulator(3)
    acc.add(np.array([[0, 2, 1, 1]]), np.array([[0, 0, 1, 1]]))
    iou = acc.iou()
    # class 2: I=0, U=1 -> 0 (in the mean); class 0: I=1, U=2
    assert iou.tolist() == [0.5, 1.0, 0.0]
    assert acc.summary(list("abc"))["mIoU"] == pytest.approx(0.5)


def test_areas_are_summed_over_the_split_not_averaged_per_image():
    acc = IoUAccumulator(2)
    acc.add(np.array([[0, 0, 0, 0]]), np.array([[0, 0, 0, 0]]))  # class 0: I=4, U=4
    acc.add(np.array([[1, 1]]), np.array([[0, 1]]))  # class 0: I=0, U=1; class 1: I=1, U=2
    iou = acc.iou()
    assert iou[0] == pytest.approx(4 / 5)  # per-image averaging would give (1 + 0) / 2
    assert iou[1] == pytest.approx(1 / 2)
    assert acc.summary(["a", "b"])["aAcc"] == pytest.approx(5 / 6)
    assert acc.images == 2


def test_reduce_zero_label():
    label = np.array([[0, 1, 2, IGNORE]])
    assert reduce_zero_label(label).tolist() == [[IGNORE, 0, 1, IGNORE]]


def test_agrees_with_a_direct_computation_on_random_maps():
    rng = np.random.default_rng(0)
    acc = IoUAccumulator(5)
    preds, labels = [], []
    for _ in range(4):
        p = rng.integers(0, 5, (7, 9))
        t = rng.integers(0, 6, (7, 9))
        t[t == 5] = IGNORE
        acc.add(p, t)
        preds.append(p.ravel())
        labels.append(t.ravel())
    p, t = np.concatenate(preds), np.concatenate(labels)
    keep = t != IGNORE
    for c in range(5):
        inter = np.sum((p == c) & (t == c) & keep)
        union = np.sum(((p == c) | (t == c)) & keep)
        assert acc.iou()[c] == pytest.approx(inter / union)


def test_macc_divides_by_the_label_area_as_mmsegmentation_does():
    """MMSegmentation's Acc of a class is intersect / area_label (its recall), not over the
    predicted area or the union; mAcc is their mean over the classes with labels."""
    acc = IoUAccumulator(3)
    # class 0: label 4 px, predicted 2 (both right); class 1: label 3, predicted 4 (2 right);
    # class 2: predicted once, never labelled (Acc NaN, left out of mAcc)
    acc.add(np.array([[0, 0, 1, 1, 1, 1, 2]]), np.array([[0, 0, 0, 0, 1, 1, 1]]))
    per = acc.summary(["a", "b", "c"])["per_class"]
    assert per["a"]["Acc"] == pytest.approx(2 / 4) and per["b"]["Acc"] == pytest.approx(2 / 3)
    assert per["c"]["Acc"] is None
    assert acc.summary(["a", "b", "c"])["mAcc"] == pytest.approx((2 / 4 + 2 / 3) / 2)
