# The Triton sources live in the top-level kernels/ folder and install as the package ktfast.kernels.
from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["ktfast", "ktfast.*"]), "ktfast.kernels"],
    package_dir={"ktfast.kernels": "kernels"},
)
