"""A worker for the DDP gradient test (spawned processes import it by name)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def one_step(rank: int, world: int, init_file: str, out: str) -> None:
    from trainer.methods.synseg.losses import LossConfig, MCCLoss
    from trainer.methods.synseg.model import ModelConfig, SynSeg

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same start on every rank, as DDP requires
    cfg = ModelConfig(arch="synseg-tiny", pretrained=None, taps=(1, 2, 3), ffn_dim=64, dropout=0.0)
    model = SynSeg(cfg).double()
    net = torch.nn.parallel.DistributedDataParallel(model)
    images, text = batch(rank, model.backbone.embed_dim)
    terms = MCCLoss(LossConfig())(
        *(lambda o: (o.f, o.fbar))(net(images, text)), text, torch.ones(2, 2, dtype=torch.bool)
    )
    terms["total"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save(grads, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def batch(rank: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own data: two images, two labels each."""
    g = torch.Generator().manual_seed(100 + rank)
    return (
        torch.rand(2, 3, 64, 64, generator=g, dtype=torch.float64),
        torch.randn(2, 2, d, generator=g, dtype=torch.float64),
    )
