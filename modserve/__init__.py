"""modserve: serve layer-swapped LLMs — one resident expert, per-language block packs."""

__version__ = "0.1.0"
