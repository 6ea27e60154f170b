"""flatprompt trainer: prompt learning (CoOp text context, VPT visual prompts) for open_clip models."""

__all__ = ["__version__"]
__version__ = "0.1.0"
