"""BentoML services used only by ``benchmarks/serve_load.py``: the floor and the distributed prototype."""
