"""Doctest collection: the Hugging Face and open_clip backends' examples need the ``hf`` / ``openclip`` extras."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("transformers") else ["tokenmerge_patch/backends/hf.py"]
collect_ignore += [] if importlib.util.find_spec("open_clip") else ["tokenmerge_patch/backends/openclip.py"]
