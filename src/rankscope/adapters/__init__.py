"""Adapters: trainable modules that wrap a frozen layer, apart from the methods that train them.

  lora     the LoRA layer (LoRALinear), wrapping and listing adapted layers, effective-weight gradients
  paths    its fast forward paths (merged, hybrid) and the cost model that picks one
  stored   the stored checkpoint format: per-layer rank and scaling, and the exact merge into dense weights
  common   seeded generators and module replacement (shared with rankscope.methods)

A method (rankscope.methods) decides when layers are wrapped, merged or re-drawn; everything that only
reads a stored checkpoint (analysis, export, evaluation) reads this package, never a method.
"""
