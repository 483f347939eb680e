"""Processes working together: torchrun ranks (`distributed`) and FSDP sharding of a model (`sharding`)."""
