"""The names of a decoder's matrices and of the components analysis forms from them: the one table that the model,
the methods' `targets`, the config's `analysis.components`, the analysis and the reports read.

Every linear of a block is named by the attribute the Decoder gives it (Attention: wq wk wv wo; SwiGLU: w1 gate,
w2 down, w3 up); pico-analyze's OV circuit comes per head (`ov`), per layer (`ov_layer`) and as the d x d product
(`ov_product`) (docs/metrics.md); the embeddings are measured apart.
"""

DEFAULT_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]  # what the methods target by default; valid `targets` names
TARGETS = tuple(DEFAULT_TARGETS)
OV_FORMS = ("ov", "ov_layer", "ov_product")
EMBEDDINGS = ("embed", "lm_head")
BLOCK_COMPONENTS = (*TARGETS[:4], *OV_FORMS, *TARGETS[4:])  # what the in-loop analysis can measure (analysis.components)
