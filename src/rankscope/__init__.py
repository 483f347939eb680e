"""rankscope: pretrain small LLaMA-style decoders with full-rank and memory-efficient methods,
evaluate them, and watch the rank of what they learn."""

__version__ = "0.1.0"
