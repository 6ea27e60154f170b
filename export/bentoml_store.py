"""Save a finished bundle into the local BentoML model store (``BENTOML_HOME``), so ``bentoml build`` packs it.

The entry holds the bundle's files unchanged at the root of ``model.path`` (``manifest.json`` included), so
``Bundle.load(bentoml.models.get(tag).path)`` works. Labels and metadata follow
``serving.model_store.import_bundle`` (``bundle_hash`` = sha256 of ``manifest.json``).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from serving.runtime import bundle as rt
from trainer.errors import UserError

_logger = logging.getLogger(__name__)


def save_to_bentoml(bundle_dir: str | Path, name: str) -> str:
    """Copy the verified bundle ``bundle_dir`` into a new model-store entry ``name``; return its tag.

    ``name`` is a BentoML model name (lower case letters, digits, ``-``, ``_``, ``.``), optionally with
    ``:version``; without a version BentoML generates one.
    """
    import bentoml
    from bentoml.exceptions import BentoMLException

    src = Path(bundle_dir)
    try:
        manifest = rt.read_manifest(src)
        rt.verify_files(src, manifest, checksums=True)
    except rt.BundleError as e:
        raise UserError(f"cannot save {src} to BentoML: {e}") from e
    bundle_hash = hashlib.sha256((src / rt.MANIFEST).read_bytes()).hexdigest()
    model = manifest.model
    labels = {
        "bundle_hash": bundle_hash[:16],
        "format_version": str(manifest.format_version),
        "kind": manifest.source.kind or "unknown",
    }
    metadata: dict[str, str | int | float] = {
        "bundle_hash": bundle_hash,
        "model_name": model.name or "unknown",
        "pretrained": str(model.pretrained),
        "embed_dim": manifest.embed_dim,
        "classes": manifest.classes.count if manifest.classes else 0,
        "top1_agreement": float(manifest.parity.get("top1_agreement", 0.0)),
    }
    try:
        with bentoml.models.create(name, labels=labels, metadata=metadata) as entry:
            target = Path(entry.path)
            for rel in [rt.MANIFEST, *manifest.files]:
                shutil.copy2(src / rel, target / rel)
    except (ValueError, BentoMLException) as e:
        raise UserError(
            f"BentoML could not save model '{name}' ({e}): use lower-case letters, digits, '-', '_' or '.', "
            "optionally ':version' with a version that is not in the store yet"
        ) from e
    _logger.info("saved %s to the BentoML model store as %s", src, entry.tag)
    return str(entry.tag)
