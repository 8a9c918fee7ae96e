"""The synthetic world's demo: in-world CLIP pretraining (``pretrain``), the CLIPSeg-style
decoder init (``clipseg_init``), the chain (``demo``) and its report (``report``)."""
