"""Build of the C extension ``fastqkv._ckernels`` (metadata lives in pyproject.toml)."""

from setuptools import setup

setup()
