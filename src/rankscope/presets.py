"""Named model shapes (`model.preset`), read by the config (which fills them in) and by `rankscope info`."""

from __future__ import annotations

from typing import Any

# Pico-decoder shapes (Weiss et al. 2025, Table 1; pico-lm/pico-train configs): 12 layers,
# 12 heads, 4 KV heads, vocab 50304, seq 2048. CPU presets keep the same family, smaller.
PRESETS: dict[str, dict[str, Any]] = {
    "pico-tiny": dict(d_model=96, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=384, vocab_size=50304, max_seq_len=2048),
    # pico-tiny's transformer body exactly, with the small vocabulary of the CPU corpus's BPE (the CPU studies' model)
    "pico-tiny-body": dict(d_model=96, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=384, vocab_size=2048, max_seq_len=2048),
    "pico-small": dict(d_model=384, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=1536, vocab_size=50304, max_seq_len=2048),
    # Pico's larger decoders (not in the paper), where FSDP (train.parallel=fsdp) starts to pay
    "pico-medium": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=3072, vocab_size=50304, max_seq_len=2048),
    "pico-large": dict(d_model=1536, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=6144, vocab_size=50304, max_seq_len=2048),
    # below micro (193k parameters, most of them embeddings): the smallest point of the CPU study's size trend
    "nano": dict(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=2048, max_seq_len=128),
    "micro": dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=2048, max_seq_len=128),
    # between micro and mini on a log scale of parameters (1.07M), for a size trend with three points
    "milli": dict(d_model=96, n_layers=5, n_heads=6, n_kv_heads=2, ffn_dim=384, vocab_size=2048, max_seq_len=256),
    "mini": dict(d_model=128, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=512, vocab_size=4096, max_seq_len=256),
    "small": dict(d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1024, vocab_size=8192, max_seq_len=256),
}
