"""Segmentation metrics exactly as MMSegmentation computes them.

Per class, the areas of intersection, union, prediction and label are summed over the whole
split (not averaged per image); pixels labelled 255 are ignored; with ``reduce_zero_label`` the
label 0 becomes 255 and every other label drops by one (MMSegmentation's rule for layouts
where 0 means "unlabelled"). IoU = intersection / union; classes whose union is zero over the
split (absent from both prediction and truth) are NaN and left out of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE
    out[label == IGNORE] = IGNORE
    return out


@dataclass
class IoUAccumulator:
    num_classes: int

    def __post_init__(self) -> None:
        self.intersect = np.zeros(self.num_classes, np.int64)
        self.union = np.zeros(self.num_classes, np.int64)
        self.pred_area = np.zeros(self.num_classes, np.int64)
        self.label_area = np.zeros(self.num_classes, np.int64)
        self.images = 0

    def add(self, pred: np.ndarray, label: np.ndarray) -> None:
        """pred, label: (H, W) class indices; pixels labelled 255 are ignored.

        As MMSegmentation's ``intersect_and_union``: drop the ignored pixels, then count each
        area over values in [0, num_classes) (its ``torch.histc`` skips the rest).
        """
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
        keep = label != IGNORE
        p, t = pred[keep].astype(np.int64), label[keep].astype(np.int64)
        n = self.num_classes

        def hist(x: np.ndarray) -> np.ndarray:
            x = x[(x >= 0) & (x < n)]
            return np.bincount(x, minlength=n)

        inter = hist(p[p == t])
        ap = hist(p)
        al = hist(t)
        self.intersect += inter
        self.pred_area += ap
        self.label_area += al
        self.union += ap + al - inter
        self.images += 1

    def iou(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.union > 0, self.intersect / np.maximum(self.union, 1), np.nan)

    def accuracy(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(
                self.label_area > 0, self.intersect / np.maximum(self.label_area, 1), np.nan
            )

    def summary(self, names: list[str]) -> dict:
        iou, acc = self.iou(), self.accuracy()
        total = self.label_area.sum()
        return {
            "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
            "aAcc": float(self.intersect.sum() / total) if total else float("nan"),
            "images": self.images,
            "per_class": {
                name: {
                    "IoU": None if np.isnan(i) else float(i),
                    "Acc": None if np.isnan(a) else float(a),
                }
                for name, i, a in zip(names, iou, acc, strict=True)
            },
        }
