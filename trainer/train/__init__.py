"""Training: settings and presets (``config``), the WebDataset stream (``data``), label
embeddings (``textcache``), checkpoints (``checkpoint``) and the loop itself (``loop``)."""
