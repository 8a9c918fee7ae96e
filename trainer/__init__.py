"""synseg-train: trained open-vocabulary segmentation methods, their training, their evaluation
beside the training-free ones, and the synthetic world's demo.

trainer/methods/ what each method is, behind one registry: SynSeg (``synseg``), ViL-Seg
                 (``vilseg``), the training-free baselines (``training_free``), and the
                 contract a trained method fulfils (``base``)
trainer/model/   the network parts methods share: open_clip's towers read token by token,
                 CLIPSeg's decoder with FiLM
trainer/train/   how any method learns: settings, the shard stream, label embeddings,
                 checkpoints, the optimizer and its schedule, one process or DDP, the loop
trainer/eval/    how any method is scored: benchmark readers, mIoU, sliding-window inference,
                 protocols, PAMR, the eval loop, class subsets, overlays
trainer/world/   the offline demo: in-world CLIP pretraining, the CLIPSeg-style decoder
                 init, the demo's chain and report
trainer/api.py   the Python entry point: ``trainer.load(run) -> Segmenter``, whose
                 ``segment(image, classes)`` gives labels and probabilities
trainer/export.py a run as a Hugging Face CLIPSeg checkpoint (``synseg-train export``)
trainer/cli.py   the ``synseg-train`` command line
"""


def __getattr__(name: str):
    """``trainer.load`` and ``trainer.Segmenter`` (``trainer.api``), imported when first used so
    that ``import trainer`` stays light."""
    if name in ("load", "Segmenter"):
        from trainer import api

        return getattr(api, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
