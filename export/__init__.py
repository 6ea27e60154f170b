"""torch -> ONNX model bundles (``docs/bundle.md``) for the torch-free serving runtime.

Public API:

- :func:`export.builder.export_bundle` (``ExportSource``, ``ExportOptions``) -> ``ExportResult``;
- :mod:`export.sources`: ``from_checkpoint``, ``zero_shot``, ``toy``, ``from_loaded_clip``;
- :mod:`export.tokenizer`: ``write_tokenizer_json``, ``write_pretokenizer_json``, ``tokenizer_manifest``;
- :func:`export.bentoml_store.save_to_bentoml`;
- the CLI ``python -m export`` / ``flatprompt-export`` (:func:`export.cli.main`).
"""
