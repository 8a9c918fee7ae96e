"""Evaluation: benchmark readers and class files (``datasets``), mIoU (``metrics``),
sliding-window inference (``infer``), the two protocols (``protocols``), PAMR (``pamr``), the
eval loop and class subsets (``evaluate``), benchmarks from their published files
(``prepare``), overlays (``visualize``)."""
