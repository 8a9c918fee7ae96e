"""Import open_clip where torchvision's compiled operators cannot load.

torchvision wheels from PyPI are built against CUDA; next to a CPU-only torch their compiled
library fails to load and ``import torchvision`` (hence ``import open_clip``) stops with
``operator torchvision::nms does not exist`` (pytorch/vision#9085). open_clip never calls
those detection ops, so declaring their two schemas lets the import finish. This is done only
after a real import has failed that way; a working torchvision is left alone.
(transformers' CLIPSeg imports torchvision too, through its image processors.)
"""

from __future__ import annotations

import sys

_LIBRARIES: list = []  # keep the definitions alive for the life of the process


def ensure_torchvision() -> None:
    """Make ``import torchvision`` work, declaring its missing operator schemas if needed."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torch

        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
        _LIBRARIES.append(lib)
        import torchvision  # noqa: F401


def import_open_clip():
    """``import open_clip`` (which imports torchvision) on any torch build."""
    ensure_torchvision()
    import open_clip

    return open_clip
