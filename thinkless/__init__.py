"""thinkless: train LLMs that learn when to think (Thinkless, arXiv 2505.13379)."""

# The native extension thinkless._C links against libtorch, which only `import torch` loads; importing it here
# makes `import thinkless._C` work on its own.
import torch  # noqa: F401

__version__ = "0.1.0"
