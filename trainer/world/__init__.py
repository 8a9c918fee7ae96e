"""The synthetic world's demo: in-world CLIP pretraining (``pretrain``), the chain (``demo``,
whose CLIPSeg-style decoder is a mask-supervised run of the trainer), its rows (``rows``) and
its report (``report``)."""
