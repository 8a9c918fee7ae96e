"""Evaluation: benchmark readers and class files (``datasets``), mIoU (``metrics``),
sliding-window inference (``infer``), the eval loop (``evaluate``), overlays (``visualize``)."""
