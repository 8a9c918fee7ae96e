"""SynSeg: frozen CLIP, CLIPSeg decoder with FiLM, and the Feature Synergy Structure projector.

Images enter as floats in [0, 1]; the model applies the normalisation its decoder weights were
trained with (recorded in its config). Training runs the decoder once per (image, category)
slot of a padded (B, N) batch; inference runs it once per (image, class prompt) pair, after
one backbone pass per image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synseg.errors import UserError
from trainer.methods.synseg.losses import synergy
from trainer.model.backbone import NORMALISE, FrozenCLIP
from trainer.model.decoder import CLIPSegDecoder, DecoderConfig, DecoderShape

PROJECTOR_INPUTS = ("conditioned", "visual")


@dataclass
class ModelConfig(DecoderShape):
    """SynSeg's model settings: the decoder's (``DecoderShape``: reduce_dim, heads, ffn_dim,
    refined, film_hidden, dropout), then these."""

    arch: str = "ViT-B-16-quickgelu"  # open_clip architecture (OpenAI weights need QuickGELU)
    pretrained: str | None = "openai"  # open_clip tag, a local checkpoint file, or None (random)
    taps: tuple[int, ...] = (3, 6, 9)  # visual blocks the decoder reads (0-based), CLS kept
    init_seed: int = 0  # seed of the backbone's weights when ``pretrained`` is None (random)
    decoder_init: str | None = None  # CLIPSeg or Hugging Face CLIPSeg weights for the decoder
    normalise: str = "auto"  # clip, imagenet, or auto (imagenet for CLIPSeg weights, else clip)
    # The paper's projector reads the FiLM-conditioned features. Then the text embedding flows
    # straight into the synergy vectors, and L_align/L_sep are met whatever the maps are: the
    # maps collapse to one mask for every class. "visual" reads the unconditioned features.
    projector_input: str = "conditioned"

    def __post_init__(self) -> None:
        self.taps = tuple(self.taps)
        problems = []
        if self.projector_input not in PROJECTOR_INPUTS:
            problems.append(f"projector_input must be one of {PROJECTOR_INPUTS}")
        if self.normalise not in ("auto", *NORMALISE):
            problems.append(f"normalise must be auto or one of {tuple(NORMALISE)}")
        if problems:
            raise UserError("; ".join(problems))


@dataclass
class TrainOutput:
    logits: torch.Tensor  # (B, N, H, W)
    f: torch.Tensor  # (B, N, d) foreground synergy vectors
    fbar: torch.Tensor  # (B, N, d) background synergy vectors
    absent_maps: torch.Tensor | None = None  # (B, K, hw)
    levels: list[torch.Tensor] | None = None  # the reduced taps (B, r, h, w), deepest first


class SynSeg(nn.Module):
    def __init__(self, cfg: ModelConfig, backbone: FrozenCLIP | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone or FrozenCLIP(cfg.arch, cfg.pretrained, cfg.taps, cfg.init_seed)
        b = self.backbone
        self.decoder = CLIPSegDecoder(
            DecoderConfig.of(
                cfg,
                width=b.width,
                cond_dim=b.embed_dim,
                depth=len(cfg.taps),
                patch_size=b.patch_size,
            )
        )
        d = b.embed_dim
        # FSS projector: decoder features on the patch grid -> text-embedding width.
        self.projector = nn.Sequential(
            nn.Conv2d(cfg.reduce_dim, d, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(d, d, kernel_size=1),
        )
        self.decoder_format = None
        if cfg.decoder_init:
            from trainer.model.decoder import load_decoder_state

            self.decoder_format = load_decoder_state(self.decoder, cfg.decoder_init)
        norm = cfg.normalise
        if norm == "auto":
            norm = "imagenet" if self.decoder_format else "clip"
        self.normalisation = norm
        mean, std = NORMALISE[norm]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # ----------------------------------------------------------------- parts

    @property
    def native_size(self) -> int:
        """The input size the image tower was made for (protocol sizes scale with it)."""
        return self.backbone.train_size

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """FiLM + decoder + projector: everything but the frozen backbone."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def _visual(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        x = (images - self.mean) / self.std
        taps = self.backbone.visual_taps(x)
        p = self.backbone.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        return self.decoder.reduce_taps(taps), grid

    @staticmethod
    def levels(reduced: list[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
        """The reduced taps as maps (B, r, h, w), deepest first: class-agnostic features the
        decoder reads (what the physically-guided heads train, trainer.train.physical)."""
        return [r[:, 1:].transpose(1, 2).reshape(r.shape[0], -1, *grid) for r in reduced]

    def dense_train(self, images: torch.Tensor, text: torch.Tensor):
        """Logits (B, C, H, W) of every class embedding (C, d) on every image, with gradients,
        and the feature levels: what mask-supervised training reads."""
        from trainer.methods.base import DenseOutput

        reduced, grid = self._visual(images)
        logits = self._class_logits(reduced, grid, tuple(images.shape[-2:]), text)
        return DenseOutput(logits, self.levels(reduced, grid))

    def _project(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(P, 1 + hw, r) tokens -> (P, hw, d) projected patch features."""
        x = self.levels([tokens], grid)[0]  # (P, r, h, w)
        return self.projector(x).flatten(2).transpose(1, 2)  # (P, hw, d)

    def _class_logits(self, reduced, grid, size, classes: torch.Tensor, chunk: int = 0):
        """Logits (B, C, H, W): the decoder over every (image, class embedding) pair, ``chunk``
        pairs at a time (0: all at once)."""
        B, C = reduced[0].shape[0], classes.shape[0]
        image_of = torch.arange(B, device=classes.device).repeat_interleave(C)
        cond = classes.repeat(B, 1)  # (B*C, d)
        step = chunk or B * C
        out = [
            self.decoder(reduced, cond[i : i + step], image_of[i : i + step], grid, size)[0]
            for i in range(0, B * C, step)
        ]
        return torch.cat(out).view(B, C, *size)

    @staticmethod
    def pooled_maps(logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Sigmoid activation maps pooled to the patch grid: (P, H, W) -> (P, hw)."""
        return F.adaptive_avg_pool2d(torch.sigmoid(logits)[:, None], grid).flatten(1)

    # ----------------------------------------------------------------- training

    def forward_train(
        self, images: torch.Tensor, text: torch.Tensor, absent_text: torch.Tensor | None = None
    ) -> TrainOutput:
        """images (B, 3, H, W) in [0, 1]; text (B, N, d) label embeddings (padded slots allowed:
        the loss masks them); absent_text (B, K, d) embeddings of categories not in the image."""
        B, N, d = text.shape
        reduced, grid = self._visual(images)
        size = tuple(images.shape[-2:])
        image_of = torch.arange(B, device=images.device).repeat_interleave(N)  # (B*N,)
        logits, conditioned = self.decoder(reduced, text.reshape(B * N, d), image_of, grid, size)
        maps = self.pooled_maps(logits, grid).view(B, N, -1)  # (B, N, hw)
        if self.cfg.projector_input == "visual":
            feats = self._project(reduced[0], grid)  # (B, hw, d): one per image
        else:
            feats = self._project(conditioned, grid).view(B, N, -1, d)  # (B, N, hw, d)
        f, fbar = synergy(maps, feats)
        absent_maps = None
        if absent_text is not None and absent_text.shape[1]:
            K = absent_text.shape[1]
            image_of_k = torch.arange(B, device=images.device).repeat_interleave(K)
            neg_logits, _ = self.decoder(
                reduced, absent_text.reshape(B * K, d), image_of_k, grid, size
            )
            absent_maps = self.pooled_maps(neg_logits, grid).view(B, K, -1)
        levels = self.levels(reduced, grid)
        return TrainOutput(logits.view(B, N, *size), f, fbar, absent_maps, levels)

    def forward(self, images, text, absent_text=None) -> TrainOutput:
        return self.forward_train(images, text, absent_text)  # what DDP calls

    # ----------------------------------------------------------------- inference

    @torch.no_grad()
    def segment(
        self, images: torch.Tensor, classes: torch.Tensor, chunk: int = 256
    ) -> torch.Tensor:
        """Logits (B, C, H, W) of C class embeddings (C, d) on images (B, 3, H, W) in [0, 1].

        One backbone pass per image; the decoder runs over all (image, class) pairs in chunks.
        """
        reduced, grid = self._visual(images)
        return self._class_logits(reduced, grid, tuple(images.shape[-2:]), classes, chunk)

    def describe(self) -> dict:
        """What a checkpoint must record to rebuild this model."""
        return {
            **asdict(self.cfg),
            "normalisation": self.normalisation,
            "decoder_format": self.decoder_format,
        }


class DecoderScorer:
    """SynSeg's inference (``trainer.methods.base.Scorer``): the decoder's logits for every
    (window, class prompt) pair after one backbone pass per window; a class name's embedding is
    the mean of its templates' embeddings, unnormalised, as FiLM was trained on; probabilities
    are the logits' sigmoid."""

    def __init__(self, model, chunk: int = 256) -> None:
        self.model, self.chunk = model, chunk
        self.mean, self.std = model.mean, model.std
        self.patch_size = model.backbone.patch_size
        self.floors_whole = self.pads_windows = False  # the grid rounds to patches

    def encode_classes(self, names: list[str], templates: list[str]) -> torch.Tensor:
        emb = self.model.backbone.encode_text([t.format(n) for n in names for t in templates])
        return emb.view(len(names), len(templates), -1).mean(1)

    def scores(self, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.model.segment(crops, text, self.chunk)

    def probabilities(self, scores: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.sigmoid(scores)
