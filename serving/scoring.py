"""Class index (trained + registered classes) and the classification maths.

``logits = logit_scale * cos(image, class) + logit_bias`` over the chosen classes, optionally
post-hoc logit-adjusted (Menon et al., 2021: ``logits - tau * log(prior)``), then a softmax over the
chosen classes and the top-k.

Priors for the adjustment: a trained class has ``prior = max(count, 1) / sum(max(counts, 1))``
(the bundle's ``classes.json`` counts; zero counts are clamped to 1 so that no logit becomes
infinite). A registered class has no training count; it is given the **mean** trained prior
``1 / C`` (i.e. treated as a class of average frequency), so ``tau`` moves it neither towards the
head nor towards the tail. The candidate subset does not renormalise priors: a constant shift does
not change a softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from serving.errors import ServeError
from serving.names import name_key

TRAINED, REGISTERED = "trained", "registered"


@dataclass(frozen=True)
class ClassIndex:
    """An immutable view of every class a request can be classified into (swapped atomically)."""

    names: tuple[str, ...]
    kinds: tuple[str, ...]
    matrix: np.ndarray  # float32 [K, E], rows L2-normalised
    log_prior: np.ndarray  # float32 [K]
    n_trained: int
    version: int  # registry version the registered rows come from
    keys: dict[str, tuple[int, ...]] = field(repr=False)  # name key -> row indices (trained names may repeat)

    @staticmethod
    def build(
        trained_names: Sequence[str],
        trained_counts: Sequence[int] | np.ndarray,
        trained_embeddings: np.ndarray,
        registered: Sequence[tuple[str, np.ndarray]],
        version: int,
    ) -> ClassIndex:
        """Combine the bundle's trained classes with the registered ``(name, embedding)`` rows."""
        n_trained = len(trained_names)
        counts = np.maximum(np.asarray(trained_counts, dtype=np.float64), 1.0)
        if counts.shape != (n_trained,):
            raise ValueError(f"{counts.shape[0]} class counts for {n_trained} classes")
        log_prior_trained = np.log(counts / counts.sum())
        mean_prior = np.log(1.0 / max(n_trained, 1))
        reg_names = [name for name, _ in registered]
        if registered:
            reg_matrix = np.stack([np.asarray(vec, dtype=np.float32) for _, vec in registered])
            matrix = np.concatenate([np.asarray(trained_embeddings, dtype=np.float32), reg_matrix])
        else:
            matrix = np.asarray(trained_embeddings, dtype=np.float32)
        log_prior = np.concatenate([log_prior_trained, np.full(len(registered), mean_prior)]).astype(
            np.float32
        )
        names = (*trained_names, *reg_names)
        keys: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            keys.setdefault(name_key(name), []).append(i)
        return ClassIndex(
            names=tuple(names),
            kinds=(TRAINED,) * n_trained + (REGISTERED,) * len(registered),
            matrix=np.ascontiguousarray(matrix),
            log_prior=log_prior,
            n_trained=n_trained,
            version=version,
            keys={k: tuple(v) for k, v in keys.items()},
        )

    def __len__(self) -> int:
        return len(self.names)

    def kind_of(self, key: str) -> str | None:
        """``trained``/``registered`` for a known name key (trained wins), else None."""
        rows = self.keys.get(key)
        if not rows:
            return None
        return TRAINED if rows[0] < self.n_trained else REGISTERED

    def resolve(self, candidates: Sequence[str]) -> np.ndarray:
        """Row indices of the candidate names (duplicates removed, order kept); 404 on unknown names."""
        rows: list[int] = []
        seen: set[int] = set()
        unknown: list[str] = []
        for raw in candidates:
            key = name_key(raw)
            found = self.keys.get(key)
            if not found:
                unknown.append(raw)
                continue
            for row in found:
                if row not in seen:
                    seen.add(row)
                    rows.append(row)
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise ServeError(404, "unknown_class", f"unknown candidate class names: {shown}{more}")
        return np.asarray(rows, dtype=np.int64)

    def classify(
        self,
        image_embeddings: np.ndarray,
        *,
        logit_scale: float,
        logit_bias: float | None,
        top_k: int,
        tau: float = 0.0,
        rows: np.ndarray | None = None,
    ) -> list[list[dict[str, object]]]:
        """Top-k labels per image: ``[{"name", "kind", "probability"}, ...]`` sorted by probability."""
        matrix = self.matrix if rows is None else self.matrix[rows]
        logits = logit_scale * (np.asarray(image_embeddings, dtype=np.float32) @ matrix.T)
        if logit_bias is not None:
            logits = logits + logit_bias
        if tau:
            prior = self.log_prior if rows is None else self.log_prior[rows]
            logits = logits - tau * prior[None, :]
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(top_k, probs.shape[1])
        index = np.arange(len(self.names)) if rows is None else rows
        results = []
        for p in probs:
            top = np.argsort(-p, kind="stable")[:k]
            results.append(
                [
                    {"name": self.names[index[j]], "kind": self.kinds[index[j]], "probability": float(p[j])}
                    for j in top
                ]
            )
        return results
