"""ktfast: fast training and search of knowledge transfer graphs."""
import os

import torch

# KTFAST_KERNELS=1 without a GPU runs the Triton kernels in Triton's interpreter. Triton fixes the
# mode when it is imported, and importing the models (torchvision) imports it: so set it here, first.
if os.environ.get("KTFAST_KERNELS") == "1" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ktfast.graph import Graph, GraphError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Graph", "GraphError", "__version__"]
