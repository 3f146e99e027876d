"""thinkless: train LLMs that learn when to think (Thinkless, arXiv 2505.13379)."""

__version__ = "0.1.0"
