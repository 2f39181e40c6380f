"""ktfast: fast training and search of knowledge transfer graphs."""
from ktfast.graph import Graph, GraphError  # noqa: F401

__version__ = "0.1.0"
__all__ = ["Graph", "GraphError", "__version__"]
