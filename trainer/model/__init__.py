"""The network: frozen open_clip backbone (``backbone``), CLIPSeg decoder with FiLM
(``decoder``), SynSeg = backbone + decoder + FSS projector (``synseg``), the losses (``losses``)."""
