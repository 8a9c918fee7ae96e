"""The network parts methods share: open_clip's towers read token by token (``backbone``),
CLIPSeg's decoder with FiLM and its weight loaders (``decoder``), the open_clip import that
survives a CPU-only torch (``compat``), and the tiny architecture's config (``configs``)."""
