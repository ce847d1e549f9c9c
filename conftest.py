"""Doctest collection: the Hugging Face backend's examples need the ``hf`` extra."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("transformers") else ["tokenmerge_patch/backends/hf.py"]
