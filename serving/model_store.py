"""Import a bundle directory into the BentoML model store, so a service or ``bentoml build`` can use it by tag.

Usage::

    python -m serving.model_store DIR [--name flatprompt]      # prints the new tag, e.g. flatprompt:k3j...

The bundle is verified against its manifest first (sha256 of every file), then copied file by file
into a new model-store entry whose labels carry the bundle hash and model name. ``bentoml models list``
shows it; ``FLATPROMPT_MODEL_TAG`` (default ``flatprompt:latest``) selects it at serving time.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
from pathlib import Path

_logger = logging.getLogger(__name__)
DEFAULT_NAME = "flatprompt"


def import_bundle(bundle_dir: str | Path, name: str = DEFAULT_NAME) -> str:
    """Copy a verified bundle into the model store (``BENTOML_HOME``); return the new tag."""
    import bentoml

    from serving.runtime.bundle import read_manifest, verify_files

    source = Path(bundle_dir)
    manifest = read_manifest(source)
    verify_files(source, manifest, checksums=True)
    bundle_hash = hashlib.sha256((source / "manifest.json").read_bytes()).hexdigest()
    labels = {"bundle_hash": bundle_hash[:16], "format_version": str(manifest.format_version)}
    metadata = {"bundle_hash": bundle_hash, "model_name": manifest.model.name or "unknown"}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        target = Path(model.path)
        for rel in ["manifest.json", *manifest.files]:
            shutil.copy2(source / rel, target / rel)
    _logger.info("imported %s as %s", source, model.tag)
    return str(model.tag)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: import one bundle directory and print its tag."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("bundle", help="bundle directory (contains manifest.json)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="model name in the store (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        tag = import_bundle(args.bundle, args.name)
    except Exception as exc:  # BundleError, OSError, BentoML's ValueError on a bad name
        _logger.error("cannot import %s: %s", args.bundle, exc)
        return 2
    sys.stdout.write(tag + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
