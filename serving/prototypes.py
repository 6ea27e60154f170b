"""Class prototypes from example images: the blend the service stores for a class registered with examples.

Tip-Adapter-like in spirit (a cache of example features), without any training: the prototype is the
normalised blend of the class name's text embedding and the mean embedding of its example images.
"""

from __future__ import annotations

import numpy as np


def auto_text_weight(examples: int) -> float:
    """Default blend weight of the text embedding for K example images: 1 / (1 + sqrt(K)).

    1 example: 0.5; 4: 0.33; 16: 0.2. Chosen by ``benchmarks/register_examples.py`` on the toy world's
    novel classes (README, "Registering classes from example images"): more examples earn more weight.
    """
    return 1.0 / (1.0 + float(np.sqrt(max(examples, 1))))


def blend_prototype(text: np.ndarray, images: np.ndarray, text_weight: float) -> np.ndarray:
    """``normalize(w * text + (1 - w) * normalize(mean(images)))``: a class prototype from its name and examples."""
    image = images.mean(axis=0)
    image = image / max(float(np.linalg.norm(image)), 1e-12)
    mixed = text_weight * text + (1.0 - text_weight) * image
    return (mixed / max(float(np.linalg.norm(mixed)), 1e-12)).astype(np.float32)
