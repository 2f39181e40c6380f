"""ktfast: fast training and search of knowledge transfer graphs.

The Python API (docs/ARCHITECTURE.md §8; `docs/python_api.md`): `ktfast.train`, `ktfast.load_run`, `ktfast.search`,
`ktfast.TransferStep`, `ktfast.Graph`, and the typed errors GraphError, ConfigError, DatasetError.
"""

import os

import torch

# KTFAST_KERNELS=1 without a GPU runs the Triton kernels in Triton's interpreter. Triton fixes the
# mode when it is imported, and importing the models (torchvision) imports it: so set it here, first.
if os.environ.get("KTFAST_KERNELS") == "1" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ktfast.config import ConfigError  # noqa: E402
from ktfast.data import DatasetError  # noqa: E402
from ktfast.graph import Graph, GraphError  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Graph",
    "GraphError",
    "ConfigError",
    "DatasetError",
    "Run",
    "TransferStep",
    "load_run",
    "search",
    "train",
    "api",
    "__version__",
]


from ktfast import api  # noqa: E402
from ktfast.api import Run, TransferStep, load_run, search, train  # noqa: E402
