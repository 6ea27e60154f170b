"""Examples shown on the docs page (``/``) and in ``/docs.json``: names and an image of the toy world.

The demo bundle (``bundles/toy``, ``docs/bundle.md``) is trained on the toy world's colour-shape classes
(``"red circle"``, ``"blue triangle"``, ...); the registered examples are names outside that world.
``SAMPLE_IMAGE_BASE64`` is a 32x32 PNG of a red circle rendered by ``trainer.toyworld.world`` (clean
domain, seed 0, test split, first image); the demo bundle classifies it as ``red circle``.
"""

from __future__ import annotations

TRAINED_EXAMPLES = ("red circle", "blue triangle", "yellow star")
REGISTERED_EXAMPLES = ("grey hexagon", "pink arrow")
TEMPLATE_EXAMPLES = ("a photo of a {}.", "a drawing of a {}.")
BUNDLE_EXAMPLE = "3f5a9c0d1e2b4a67"

SAMPLE_IMAGE_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAFpElEQVR42jWWMc8nVRnFf+fc+e/Lru/uIpjIUhgL/QIIpevG"
    "xMJE1NoPIKElthZSa4+0hkRKYLEyJsTGBCzslMLQgIlRzLqsy+47zzkW8zLVzNy5d+5z7nnOObr55DOxJDOpkNy2FY4pGKV7"
    "0MZSWjfSFoJmodZJZMQisNpQaoSo4ghoSbeymAaNWqHUFQr1QiXdLteYTShuVimbVadFqRAIiTYo2oQVdoG0ylrqqBvqaK0V"
    "9sqLRNLx36a0XJe+e9Zn1iq8dzF/35U4AVVRXYkRhu4qlkGme1Ap1AyhLKgl0XYhluGla7r7FM+d+rc9DyY/P9dvbvCNVRRD"
    "1nSIY7SuXLu5lFTGEKnKgV+wqAATRaWWorx6fXv+xEv3+s4jPhr9O31C2/ev9ntn608X+TS4rii20PWvPKvpSKpgDHXFNtQD"
    "vgRFaqRaL5+t71zpS/fyGdw56QdXdfsMD3LuIaIf/WfuzwqDkNH508+6neIKU0kZanvoNg2SPMwSnK++/ZRf/rS3r/rFM55d"
    "qkL14d7fPuwfHuln1+eT+PX7kX0AvbnCWdFIS7vqWgphSbs2e0gtGvWF0wp+4+keyD1of/85b/4vf9271MDdh37l6vq1j6Jj"
    "1jZk7VsdU8WVoNAi+aTJSJ4eb7956pNS649nf/PhvPOY+xOIvH37LD++sm6fWnXdb1x1C7OtolN7UZajqFGWi9p2BGpZBK04"
    "w58v5vXP8kEPQnC+/JMzXrzKrW1dcq4JVY/20qaWqXALWbhWYqcYJbKngQryl+kL9ftT4ufP8sMzv3hNqlP9d/Teo/lwz50r"
    "Vugq4FbnT98i1ooDcpnWjSXqelKjggly+vaX/d7OneVbm00qPg5vPMi7j7jPvHbD7z7m7sNmoVh4c6WGeAjZ7VWNlUhGtdsB"
    "G7lF/Oohv7whFchbj3L3Yd+fuFT+xZe2m+7vHjWgkVbJvtbV69IlZgKV9hC/FJW6m71TNcX96MKfpHeeWK/en9cf9B9BWt86"
    "+ZVrfP3kn97r44xYMmld6frNW5glNcySc5xO5FWVGazAEuVQPC/63EmvnG/n7h8f5/aVnmu9+3B/7XN9NgWhoKUQqhtP3ooQ"
    "asuSjrtGrKiKxCHAAFor6aYGVfoq+domygePkTocktaCQTCwYavVAUzrAwotFBV5QdixFSCzvIKYYP8r/mebHvXZhoKywtRs"
    "oXIyCElLQxclOhrNqZW0leml7K1OPSDEHleNAAWFFFAasWQV77IQEGhdWsU+GdI4iYJ81CKqJk28VyKWmmPfY3qIz4xWRbQr"
    "6sI1cMwVYiqYSkvCajfIQq5GZSQjbFbpDLTjarWkhWopGqnUEbFapXJQ5Zyk9nhAsCmKEurddVctJ0bRsldVOYdyScalaY0E"
    "QbUtAZEkaZzCxImmlXYYoa0pVcWiEUlGyqEfMpiiJWRgE7TCruIeH+0qQxuJRd0uSmk3Rbh4K7t2ZNTaDAARU6IFGe1FRBUy"
    "AeQDDyvUs1ACJUZVi1ZqDQuNOUWUSkuptrraBErJ9NLWoWqLKxU3hpUY4YIFrsosWVbbSwFRLHOUk1q90MUKibEOT689l8nF"
    "3Zf31hIFu/Rg8QGr61KllRsCR2qSoLbS4nW4u44olAupu2SOa8ssy1xmCIKDolpWcOCYWtUbQNvLSDPHZkaFUUIZsSVf0EhU"
    "oa23YmtGVSxqkR6jlx0WOBSAIOkQM2+k49KeIDUrxxDDoUet7MrLSXScu1Day+znIWrxSJOuBJFxUZSIaA6+qMepJKZV0QJH"
    "lIwPFa6EZxjZKdWQpYpSy1hBRSpSRJ0evVNmWtUeuWaBujdxO9rkuFpSIfZaJFbWnIqiQdDDIrAp5uAT0qoh1CeJIh/0RsVL"
    "xpxKt9YlEhKapmBLWc7EUucLd1MuQ7SrIa7ncMFAVxugg6xqV1yH+P8HLY+ZNco6twAAAABJRU5ErkJggg=="
)

# The 200 body shown per route, keyed by response model name (tests/test_serving_contract.py validates each).
RESPONSE_EXAMPLES: dict[str, dict[str, object]] = {
    "ClassifyResponse": {
        "results": [
            {
                "labels": [
                    {"name": "red circle", "kind": "trained", "probability": 0.917},
                    {"name": "red heart", "kind": "trained", "probability": 0.061},
                    {"name": "grey hexagon", "kind": "registered", "probability": 0.009},
                ]
            }
        ],
        "registry_version": 2,
        "bundle": BUNDLE_EXAMPLE,
    },
    "RegisterResponse": {
        "classes": [
            {"name": "grey hexagon", "status": "created", "kind": "registered"},
            {"name": "pink arrow", "status": "unchanged", "kind": "registered"},
            {"name": "red circle", "status": "trained", "kind": "trained"},
        ],
        "registered_total": 2,
        "registry_version": 3,
    },
    "UnregisterResponse": {"deleted": "grey hexagon", "registered_total": 1, "registry_version": 4},
    "ClassesResponse": {
        "registry_version": 3,
        "bundle": BUNDLE_EXAMPLE,
        "trained": [{"name": "red circle", "count": 500}, {"name": "green square", "count": 5}],
        "registered": [
            {
                "name": "grey hexagon",
                "templates": ["a photo of a {}."],
                "created_at": 1764748800.0,
            }
        ],
    },
}
