"""What a trained method gives the toolkit: the contract between a method's package and the
loop, the checkpoints, eval and the demo.

A method is one package, ``trainer/methods/<name>/``, whose ``METHOD`` is a ``TrainedMethod``:

- ``model_config`` and ``loss_config``: the dataclasses of its ``model`` and ``loss`` settings
  groups (the ``data``, ``optim`` and ``run`` groups are the loop's and shared by all);
- ``build(model_cfg)``: its model, an ``nn.Module`` with ``trainable_parameters()``,
  ``trainable_state_dict()`` (what a checkpoint holds: what trains, plus any state it must
  carry) and ``describe()`` (what a checkpoint records beside the settings);
- ``inputs(images, batch, ctx)``: one batch of the shard stream as ``StepInputs``, the keyword
  arguments of the model's forward and those of its objective;
- ``objective(loss_cfg)``: an ``nn.Module`` called as ``objective(output, **inputs.loss)``,
  returning its terms by name, ``total`` the one that is minimised;
- ``scorer(model, cfg, logit_scale)``: its inference, a ``Scorer``: dense class scores for a
  batch of windows, so the sliding window, the protocols, PAMR, the background rule and the
  metric serve every method unchanged;
- ``presets``: a folder of JSON presets (``synseg-train presets``);
- ``after_step`` (optional): what the model does after each optimizer step (an EMA);
- ``dense`` (optional): a ``Dense``, the model's dense class scores with gradients and its
  class-agnostic feature levels: what mask-supervised training (``--supervision masks``) and
  the physically-guided heads (``trainer.train.physical``) need;
- ``export_hf`` (optional): its model as a Hugging Face checkpoint, ``(state dict, config,
  image processor config, context length)`` (``synseg-train export``).

A method whose labels are embedded by a frozen text tower sets ``label_embeddings``: the loop
then encodes the shards' vocabulary once (``trainer.train.textcache``) and hands the table to
``inputs`` in the ``StepContext``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """At least float32: a forward under bf16 autocast is scored in float32 (float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class StepContext:
    """What a step may use besides its batch."""

    cfg: Any  # the run's resolved TrainConfig
    device: torch.device
    step: int
    seed: int  # this step's seed on this rank (augmentations draw from it)
    rng: random.Random  # seeded with ``seed``
    epoch: int = 0  # the epoch this step belongs to (0-based)
    labels: Any = None  # the label-embedding table (LabelCache) when label_embeddings
    vocabulary: Any = None  # the shards' label phrases (trainer.train.data.Vocabulary)


@dataclass
class StepInputs:
    model: dict  # keyword arguments of the model's forward
    loss: dict = field(
        default_factory=dict
    )  # keyword arguments of the objective, beside the output


class Scorer(Protocol):
    """A model's inference: class prompts in, dense class scores of image windows out."""

    mean: torch.Tensor  # (1, 3, 1, 1) the normalisation the model's images get (PAMR uses it)
    std: torch.Tensor
    patch_size: int
    # How a grid that is not a patch multiple is met (the harness reads these):
    # ``floors_whole``: in whole-image mode the image goes in as it is rescaled and the patch
    # convolution floors the grid (the SCLIP family), instead of a resize to a patch multiple;
    # ``pads_windows``: a window that is not a patch multiple is zero-padded (after the
    # normalisation) around its centre and its scores cut back (ClearCLIP's compute_padsize).
    floors_whole: bool
    pads_windows: bool

    def encode_classes(self, names: list[str], templates: list[str]) -> torch.Tensor:
        """(names, d) one embedding per class name, from its prompts."""

    def scores(self, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(n, names, h, w) scores of windows (n, 3, h, w) in [0, 1]."""

    def probabilities(self, scores: torch.Tensor, dim: int) -> torch.Tensor:
        """Scores turned into probabilities along the names' axis ``dim``."""


@dataclass
class DenseOutput:
    """What a dense forward gives the mask loss and the auxiliary heads."""

    logits: torch.Tensor  # (B, C, H, W) class scores at the images' size
    levels: list[torch.Tensor]  # class-agnostic features (B, c_t, h, w), deepest first


@dataclass(frozen=True)
class Dense:
    """How a method's model scores classes densely while it trains.

    ``text(model, names, ctx)``: (C, d) the class names' embeddings (with gradients when the
    text tower trains); ``forward(model, images, text)``: a ``DenseOutput``; ``widths(model)``:
    (the levels' channels, deepest first; d); ``probabilities``: how its scores become
    probabilities, which sets the mask loss: ``sigmoid`` (per-class binary cross-entropy, as
    CLIPSeg trains) or ``softmax`` (cross-entropy over the classes)."""

    text: Callable[[Any, list[str], StepContext], torch.Tensor]
    forward: Callable[..., DenseOutput]
    widths: Callable[[Any], tuple[list[int], int]]
    probabilities: str = "sigmoid"


@dataclass(frozen=True)
class TrainedMethod:
    name: str
    model_config: type
    loss_config: type
    build: Callable[[Any], torch.nn.Module]
    objective: Callable[[Any], torch.nn.Module]
    inputs: Callable[[torch.Tensor, dict, StepContext], StepInputs]
    scorer: Callable[..., Scorer]
    presets: Path
    label_embeddings: bool = False
    # Checks across setting groups (a field's own checks live in its dataclass): the resolved
    # TrainConfig in, problems out.
    check: Callable[[Any], list[str]] = lambda cfg: []
    # The model in a Hugging Face layout (None: it has none): model, TrainConfig in;
    # (state dict, config.json, preprocessor_config.json, text context length) out.
    export_hf: Callable[[Any, Any], tuple[dict, dict, dict, int]] | None = None
    # What the model does after each optimizer step (a momentum model's EMA, say): model,
    # TrainConfig in; under no_grad. Its state must be in ``trainable_state_dict``.
    after_step: Callable[[Any, Any], None] | None = None
    dense: Dense | None = None

    def preset_names(self) -> list[str]:
        return sorted(p.stem for p in self.presets.glob("*.json"))
