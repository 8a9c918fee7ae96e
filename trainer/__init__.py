"""synseg-train: the SynSeg model, its training, its evaluation and the synthetic world's demo.

trainer/model/   what the network is: frozen CLIP backbone, CLIPSeg decoder with FiLM,
                 Feature Synergy Structure and the MCCL losses
trainer/train/   how it learns: settings, the shard stream, label embeddings, checkpoints,
                 the training loop (one process or DDP)
trainer/eval/    how it is scored: benchmark readers, mIoU, sliding-window inference,
                 the eval loop, overlays
trainer/world/   the offline demo: in-world CLIP pretraining, the CLIPSeg-style decoder
                 init, the demo's chain and report
trainer/cli.py   the ``synseg-train`` command line
"""
