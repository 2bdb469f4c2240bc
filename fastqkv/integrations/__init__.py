"""Optional adapters that plug fastqkv into other frameworks.

Each submodule imports its framework when it is imported, never before:
``import fastqkv`` imports none of them.

* :mod:`fastqkv.integrations.transformers`: an ``attn_implementation`` for
  Hugging Face transformers (``pip install fastqkv[hf]``).
"""
