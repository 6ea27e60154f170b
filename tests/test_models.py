"""Building the frozen CLIP: the MLP activation (QuickGELU vs GELU) comes from the weights' provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.export_fixtures import TINY_CONFIG, TINY_NAME, tiny_weights
from trainer.clip_adapter import activation_name
from trainer.errors import UserError
from trainer.models import ModelIdentity, load_clip, resolve_quick_gelu
from trainer.weights import WeightsSource


@pytest.fixture()
def fake_openai_tag(tmp_path, monkeypatch):
    """A hub tag 'fakeopenai' of tiny-clip whose pretrained config says quick_gelu=True, as open_clip's
    'openai' tags do; its "download" returns a local weights file."""
    import open_clip
    import open_clip.factory
    import open_clip.pretrained

    weights = tiny_weights(tmp_path / "tiny.pt")
    cfg = {"url": "https://example.invalid/tiny.pt", "hf_hub": "", "quick_gelu": True}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_NAME, {"fakeopenai": cfg})
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: str(weights))
    # and load_clip's look-up before open_clip's download finds it too (not on the network)
    monkeypatch.setattr(
        "trainer.models.require_weights",
        lambda *a, **k: WeightsSource("local", f"fake tag file {weights}", str(weights)),
    )
    return weights


def test_openai_vit_b16_tag_resolves_to_quick_gelu():
    # no download: only open_clip's table of pretrained configs is read
    assert resolve_quick_gelu("ViT-B-16", "openai", local_file=False)[0] is True
    assert resolve_quick_gelu("ViT-B-16", "laion2b_s34b_b88k", local_file=False)[0] is False
    assert resolve_quick_gelu("ViT-B-16-quickgelu", None, local_file=False)[0] is True


def test_hub_tag_trained_with_quick_gelu_builds_quick_gelu(fake_openai_tag):
    loaded = load_clip(TINY_NAME, "fakeopenai", str(TINY_CONFIG))
    assert activation_name(loaded.model) == "quick_gelu"
    assert activation_name_of_text(loaded.model) == "quick_gelu"
    assert loaded.identity.quick_gelu is True and loaded.identity.activation == "quick_gelu"
    # and the weights are the tag's
    ref = torch.load(fake_openai_tag, weights_only=True)
    assert torch.equal(loaded.model.visual.proj, ref["visual.proj"])


def activation_name_of_text(model) -> str:
    from open_clip.transformer import QuickGELU

    act = model.transformer.resblocks[0].mlp.gelu
    return "quick_gelu" if isinstance(act, QuickGELU) else type(act).__name__.lower()


def test_user_may_override_the_tag_activation(fake_openai_tag):
    loaded = load_clip(TINY_NAME, "fakeopenai", str(TINY_CONFIG), quick_gelu=False)
    assert activation_name(loaded.model) == "gelu" and loaded.identity.quick_gelu is False


def test_local_weights_file_of_unknown_activation_is_refused(tmp_path):
    weights = tiny_weights(tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"model\.quick_gelu=true"):
        load_clip(TINY_NAME, str(weights), str(TINY_CONFIG))
    for flag, name in ((True, "quick_gelu"), (False, "gelu")):
        loaded = load_clip(TINY_NAME, str(weights), str(TINY_CONFIG), quick_gelu=flag)
        assert activation_name(loaded.model) == name and loaded.identity.quick_gelu is flag


def test_local_weights_under_a_config_that_declares_the_activation(tmp_path):
    cfg = json.loads(TINY_CONFIG.read_text())
    cfg["quick_gelu"] = True
    path = tmp_path / "tiny-clip-qg.json"
    path.write_text(json.dumps(cfg))
    weights = tiny_weights(tmp_path / "w.pt")
    loaded = load_clip("tiny-clip-qg", str(weights), str(path))
    assert activation_name(loaded.model) == "quick_gelu" and loaded.identity.quick_gelu is True


def test_random_init_and_packaged_toy_keep_their_config_activation():
    from trainer.models import load_toy_clip

    toy = load_toy_clip()
    assert activation_name(toy.model) == "gelu" and toy.identity.quick_gelu is False


def test_checkpoint_rebuild_uses_the_recorded_activation(tmp_path):
    from trainer.checkpoint import build_prompted

    weights = tiny_weights(tmp_path / "w.pt")
    base = load_clip(TINY_NAME, str(weights), str(TINY_CONFIG), quick_gelu=True).identity
    spec = {"n_ctx": 2, "ctx_init": None, "vpt_length": 0, "vpt_deep": False, "template": "a photo of a {}."}
    model = build_prompted(base, spec, "cpu")
    assert activation_name(model.clip) == "quick_gelu"
    # a checkpoint written before the activation was recorded rebuilds as it was trained (config's GELU)
    legacy = {k: v for k, v in base.to_dict().items() if k != "quick_gelu"}
    old = ModelIdentity(**legacy)
    assert old.quick_gelu is None
    assert activation_name(build_prompted(old, spec, "cpu").clip) == "gelu"


def test_identity_records_activation():
    ident = ModelIdentity("m", None, None, "3.3.0", None, quick_gelu=True)
    assert ident.to_dict()["quick_gelu"] is True and ident.activation == "quick_gelu"
    assert Path(TINY_CONFIG).is_file()
