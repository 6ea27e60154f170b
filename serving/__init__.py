"""The BentoML service (``serving.service``); imports no torch, open_clip, trainer or exporter."""

__version__ = "0.1.0"  # the package version (pyproject.toml); a Bento has no package metadata to read
