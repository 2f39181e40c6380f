# The Triton sources live in the top-level kernels/ folder and install as ktfast.kernels.
from setuptools import setup

setup(
    packages=["ktfast", "ktfast.models", "ktfast.kernels"],
    package_dir={"ktfast": "ktfast", "ktfast.models": "ktfast/models", "ktfast.kernels": "kernels"},
)
