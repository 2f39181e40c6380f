"""Triton kernels of ktfast (imported as ``ktfast.kernels``)."""
