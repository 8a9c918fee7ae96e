"""export: a trained run out of the toolkit, as a checkpoint other code loads.

``--format hf`` writes a Hugging Face ``CLIPSegForImageSegmentation`` folder (``config.json``,
``model.safetensors``, ``preprocessor_config.json``, CLIP's tokenizer files and a
``README.md`` that says where it came from), which ``from_pretrained(DIR)`` loads and which
gives the run's logits. The method decides its layout (``TrainedMethod.export_hf``); a method
without one, or a setting the layout cannot hold, is refused in one line. The folder is written
beside its destination and renamed into place, so an interrupted export leaves nothing
half-written; an existing destination is refused. ``push_to_hub`` then uploads the folder to a
Hugging Face Hub repository (``huggingface_hub``'s ``create_repo`` and ``upload_folder``, as
open_clip's ``push_to_hf_hub`` does).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from synseg.errors import UserError

FORMATS = ("hf",)


@dataclass
class ExportConfig:
    checkpoint: str  # a run folder or one of its checkpoints
    output: str  # the folder to write (must not exist)
    format: str = "hf"  # hf: Hugging Face's CLIPSegForImageSegmentation
    push_to_hub: str | None = None  # also upload to this Hub repository (user/name)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}")


@dataclass
class ExportStats:
    method: str = ""
    checkpoint: str = ""
    output: str = ""
    tensors: int = 0
    files: list[str] = field(default_factory=list)
    pushed_to: str | None = None


def run_export(cfg: ExportConfig) -> ExportStats:
    import torch
    from safetensors.torch import save_file

    from trainer import methods
    from trainer.train.checkpoint import find, load_model

    out = Path(cfg.output)
    if out.exists():
        raise UserError(f"{out} exists: export writes a new folder")
    ckpt = find(cfg.checkpoint)
    model, train_cfg = load_model(ckpt, "cpu")
    method = methods.trained(train_cfg.method)
    if method.export_hf is None:
        raise UserError(f"{train_cfg.method} has no Hugging Face layout to export to")
    state, config, processor, context = method.export_hf(model, train_cfg)
    tmp = out.with_name(out.name + ".export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        from trainer.model.hf import write_tokenizer

        files = ["config.json", "model.safetensors", "preprocessor_config.json"]
        files += write_tokenizer(tmp, context)
        (tmp / "README.md").write_text(_card(train_cfg, ckpt, config))
        files.append("README.md")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats = ExportStats(train_cfg.method, str(ckpt), str(out), len(tensors), files)
    if cfg.push_to_hub:
        stats.pushed_to = push_to_hub(out, cfg.push_to_hub, train_cfg.method)
    return stats


def push_to_hub(folder: Path, repo: str, method: str) -> str:
    """Upload ``folder`` to the Hub repository ``repo`` (made if it does not exist)."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError(
            "--push-to-hub needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    api = HfApi()
    try:
        url = api.create_repo(repo, exist_ok=True)
        api.upload_folder(
            repo_id=repo, folder_path=str(folder), commit_message=f"{method} exported by synseg"
        )
    except Exception as e:  # the hub client's own errors: offline, no token, no rights
        raise UserError(f"cannot push to {repo}: {str(e).splitlines()[0]}") from None
    return str(url)


def _card(train_cfg, ckpt: Path, config: dict) -> str:
    return (
        f"# {train_cfg.method}, exported from {ckpt.name}\n\n"
        "A `CLIPSegForImageSegmentation` checkpoint written by the SynSeg toolkit's "
        "`synseg-train export`: the run's frozen CLIP and its decoder, taps "
        f"{config['extract_layers']}, FiLM width {config['reduce_dim']}.\n\n"
        "```python\n"
        "from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor\n\n"
        'model = CLIPSegForImageSegmentation.from_pretrained("THIS_FOLDER")\n'
        'processor = CLIPSegProcessor.from_pretrained("THIS_FOLDER")\n'
        "```\n\n"
        "The run's settings:\n\n```json\n" + json.dumps(train_cfg.to_dict(), indent=2) + "\n```\n"
    )
