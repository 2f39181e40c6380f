# The Triton sources live in the top-level kernels/ folder; ktfast/kernels links to it, so that the
# package tree is the import tree (ktfast.kernels) for setuptools and import-linter alike.
from setuptools import find_packages, setup

setup(packages=find_packages(include=["ktfast", "ktfast.*"]))
