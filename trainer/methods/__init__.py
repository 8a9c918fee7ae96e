"""The methods this toolkit trains and scores, by name: one registry for the loop, the
checkpoints, ``eval``, ``segment`` and the demo, none of which names a method itself.

| kind          | what it is                                                             |
|---------------|------------------------------------------------------------------------|
| trained       | a package under ``trainer/methods/<name>/`` (``base.TrainedMethod``):   |
|               | its settings, model, losses, presets and inference; ``synseg-train run``|
| weights       | a trained method's model with released weights and no training of ours |
| training-free | the frozen CLIP's last block rewritten (``training_free``)              |

A method's package is imported only when it is used, so listing the methods costs nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from synseg.errors import UserError

KINDS = ("trained", "weights", "training-free")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    kind: str  # one of KINDS
    summary: str  # one line, for ``synseg-train methods``
    module: str  # the package or module that implements it
    model: str = ""  # weights: the trained method whose model it scores
    # the common protocol its paper reports under (what --protocol native scores it under);
    # a training-free method's own configs are in training_free.NATIVE_*
    protocol: str = ""


REGISTRY: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo(
            "synseg",
            "trained",
            "SynSeg: CLIPSeg decoder with FiLM on a frozen CLIP, Feature Synergy Structure, "
            "MCCL on caption noun phrases",
            "trainer.methods.synseg",
            protocol="tcl",  # SynSeg's tables: TCL's harness
        ),
        MethodInfo(
            "vilseg",
            "trained",
            "ViL-Seg: both CLIP towers trained on captions, multi-crop self-distillation, "
            "an online clustering head (mutual information); clusters named by the text",
            "trainer.methods.vilseg",
        ),
        MethodInfo(
            "ovsegmentor",
            "trained",
            "OVSegmentor: group tokens bound by slot attention, masked entity completion, "
            "cross-image mask consistency (EMA targets) on entity-paired images",
            "trainer.methods.ovsegmentor",
            protocol="ovsegmentor",  # its section 4.1: short side 448, thresholds per dataset
        ),
        MethodInfo(
            "clipseg",
            "weights",
            "CLIPSeg's decoder as its weights give it (--decoder-init), on the frozen CLIP",
            "trainer.methods.synseg",
            model="synseg",
        ),
        MethodInfo(
            "maskclip",
            "training-free",
            "MaskCLIP: the last block's values alone (residual and FFN kept)",
            "trainer.methods.training_free",
        ),
        MethodInfo(
            "sclip",
            "training-free",
            "SCLIP: correlative self-attention, softmax(qq) + softmax(kk)",
            "trainer.methods.training_free",
        ),
        MethodInfo(
            "clearclip",
            "training-free",
            "ClearCLIP: softmax(qq) attention, no residual, no FFN",
            "trainer.methods.training_free",
        ),
        MethodInfo(
            "naclip",
            "training-free",
            "NACLIP: softmax(kk) plus a Gaussian neighbourhood, no residual, no FFN",
            "trainer.methods.training_free",
        ),
    )
}


def names(kind: str | None = None) -> list[str]:
    return [n for n, m in REGISTRY.items() if kind is None or m.kind == kind]


def info(name: str) -> MethodInfo:
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def native(name: str, dataset: str):
    """What ``--protocol native`` scores ``name`` under on ``dataset``: its authors' own config
    (a ``training_free.Native``), or the name of the common protocol its paper reports under."""
    m = info(name)
    if m.protocol:
        return m.protocol
    if m.kind == "training-free":
        from trainer.methods.training_free import native_config

        return native_config(name, dataset)
    raise UserError(
        f"{name}'s paper does not give the protocol behind its figures (resolution, windows, "
        "background): score it under --protocol tcl or sclip"
    )


def trained(name: str):
    """The ``TrainedMethod`` that trains (or, for ``weights``, builds) ``name``'s model."""
    m = info(name)
    if m.kind == "training-free":
        raise UserError(f"{name} is training-free: there is nothing to train or load")
    owner = m.model or m.name
    return importlib.import_module(REGISTRY[owner].module).METHOD


def scorer(name: str, model, train_cfg, infer):
    """``name``'s inference (``base.Scorer``) on ``model``: a trained method's own, or a
    training-free method on the model's frozen CLIP. ``infer``: the eval's InferConfig."""
    if info(name).kind == "training-free":
        from trainer.methods.training_free import DenseCLIP
        from trainer.model.backbone import FrozenCLIP

        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, FrozenCLIP):
            raise UserError(
                f"{name} rewrites a frozen CLIP, and a {train_cfg.method} model has none; "
                "score it without --checkpoint, on --set model.pretrained=..."
            )
        device = next(model.parameters()).device
        return DenseCLIP(backbone, name, infer.logit_scale).to(device)
    return trained(name).scorer(model, train_cfg, infer)
