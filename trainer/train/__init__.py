"""Training any method of ``trainer.methods``: settings and presets (``config``), the WebDataset
stream and the shards' vocabulary (``data``), label embeddings (``textcache``), checkpoints and
model loading (``checkpoint``), the optimizer and its schedule (``optim``), ranks and devices
(``distributed``), the metrics log (``metrics``) and the loop itself (``loop``)."""
