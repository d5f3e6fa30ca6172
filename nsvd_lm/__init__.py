"""nsvd-lm: nested activation-aware low-rank compression of Hugging Face causal LMs."""

__version__ = "0.1.0"
