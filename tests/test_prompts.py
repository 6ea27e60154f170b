"""Golden tests of the open_clip adapter and the prompt learners against open_clip's own encoders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer import clip_adapter as ca
from trainer.errors import UserError
from trainer.prompts import PromptedCLIP

NAMES = ["cat", "red sports car", "x", "a very long class name with many many words in it"]


def _reference_text(clip, tokenizer, names, phrase="a photo of a"):
    return F.normalize(clip.encode_text(tokenizer([f"{phrase} {n}." for n in names])), dim=-1)


def test_ctx_from_phrase_reproduces_encode_text(tiny_clip, tiny_tokenizer):
    m = PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=4, ctx_init="a photo of a")
    with torch.no_grad():
        got = m.encode_names(NAMES)
        want = _reference_text(tiny_clip.model, tiny_tokenizer, NAMES)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_other_ctx_changes_text_features(tiny_clip, tiny_tokenizer):
    m = PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=4, ctx_init=None)
    with torch.no_grad():
        got = m.encode_names(NAMES)
        want = _reference_text(tiny_clip.model, tiny_tokenizer, NAMES)
    assert (got - want).abs().max() > 1e-3


def test_longer_ctx_right_aligns_phrase(tiny_clip, tiny_tokenizer):
    m = PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=6, ctx_init="a photo of a")
    assert m.ctx is not None
    assert torch.equal(m.ctx[:2], torch.zeros_like(m.ctx[:2]))
    emb = ca.embed_tokens(tiny_clip.model, tiny_tokenizer(["a photo of a"]))[0, 1:5]
    assert torch.allclose(m.ctx[2:], emb)


def test_eot_index_follows_name_length(tiny_clip, tiny_tokenizer):
    m = PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=4, ctx_init=None)
    tokens = m.tokenize(["x", "red sports car"])
    eot = tokens.argmax(-1)
    assert eot[1] - eot[0] == 2  # two more words
    # pooling reads the EOT row: features depend on the name even though ctx is shared
    with torch.no_grad():
        f = m.encode_token_ids(tokens)
    assert (f[0] - f[1]).abs().max() > 1e-4


def test_new_names_embed_with_learned_context(tiny_clip, tiny_tokenizer):
    torch.manual_seed(1)
    m = PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=4, ctx_init=None)
    m.set_class_names(["cat", "dog"])
    with torch.no_grad():
        bank = m.encode_token_ids(m.class_tokens)
        later = m.encode_names(["dog", "unicorn"])
    assert torch.allclose(bank[1], later[0], atol=1e-6)


def test_no_visual_prompts_equals_encode_image(tiny_clip, tiny_tokenizer):
    m = PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=4, vpt_length=0)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = m.encode_image(images)
        want = F.normalize(tiny_clip.model.encode_image(images), dim=-1)
        raw = ca.encode_image_prompted(tiny_clip.model, images, None)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(raw, tiny_clip.model.encode_image(images), atol=1e-6)


@pytest.mark.parametrize("deep", [False, True])
def test_visual_prompt_gradients(tiny_clip, tiny_tokenizer, deep):
    m = PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=2, ctx_init=None, vpt_length=3, vpt_deep=deep)
    m.set_class_names(["cat", "dog", "bird"])
    m(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"ctx", "visual_prompts.prompts"}
    assert all(p.grad is None for p in tiny_clip.model.parameters())
    per_set = m.visual_prompts.prompts.grad.abs().sum(dim=(1, 2))
    assert per_set.shape[0] == (2 if deep else 1)
    assert bool((per_set > 0).all())
    assert m.ctx.grad is not None and m.ctx.grad.abs().sum() > 0


def test_deep_prompts_replace_previous_outputs(tiny_clip):
    clip = tiny_clip.model
    width = ca.vision_width(clip)
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    p0, p1, p1b = torch.randn(3, width), torch.randn(3, width), torch.randn(3, width)
    hidden = {}
    handle = clip.visual.transformer.resblocks[1].register_forward_hook(
        lambda mod, inp, out: hidden.__setitem__("in1", inp[0][:, :17].clone())
    )
    try:
        with torch.no_grad():
            ca.encode_image_prompted(clip, images, [p0, p1])
            a = hidden["in1"]
            ca.encode_image_prompted(clip, images, [p0, p1b])
            b = hidden["in1"]
            out_a = ca.encode_image_prompted(clip, images, [p0, p1])
            out_b = ca.encode_image_prompted(clip, images, [p0, p1b])
    finally:
        handle.remove()
    assert torch.equal(a, b)  # the input of block 1 does not depend on P[1]
    assert (out_a - out_b).abs().max() > 1e-5  # but the output does


def test_prompt_position_does_not_change_cls(tiny_clip):
    """Prompts carry no positional embedding, so prepending them (official VPT) = appending them (LIFT)."""
    clip = tiny_clip.model
    visual = clip.visual
    images = torch.randn(2, 3, 32, 32)
    p = torch.randn(4, ca.vision_width(clip))
    with torch.no_grad():
        appended = ca.encode_image_prompted(clip, images, [p, None])
        x = visual._embeds(images)
        x = torch.cat([x[:, :1], p.expand(2, -1, -1), x[:, 1:]], dim=1)
        for blk in visual.transformer.resblocks:
            x = blk(x)
        x = torch.cat([x[:, :1], x[:, 1 + 4 :]], dim=1)
        pooled, _ = visual._pool(x)
        prepended = pooled @ visual.proj
    assert torch.allclose(appended, prepended, atol=1e-5)


def test_avg_pooling_excludes_prompt_outputs(tiny_clip):
    clip = tiny_clip.model
    visual = clip.visual
    old = visual.pool_type
    visual.pool_type = "avg"
    try:
        images = torch.randn(2, 3, 32, 32)
        p = torch.randn(3, ca.vision_width(clip))
        with torch.no_grad():
            got = ca.encode_image_prompted(clip, images, [p, None])
            x = visual._embeds(images)
            x = torch.cat([x, p.expand(2, -1, -1)], dim=1)
            for blk in visual.transformer.resblocks:
                x = blk(x)
            patches_only = visual.ln_post(x[:, 1:17]).mean(1) @ visual.proj
    finally:
        visual.pool_type = old
    assert torch.allclose(got, patches_only, atol=1e-5)


def test_logits_use_model_scale(tiny_clip, tiny_tokenizer):
    m = PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=4)
    m.set_class_names(["cat", "dog"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = m(images)
        cos = m.encode_image(images) @ m.encode_names(["cat", "dog"]).t()
    assert torch.allclose(logits, tiny_clip.model.logit_scale.exp() * cos, atol=1e-4)


def test_bad_settings_are_user_errors(tiny_clip, tiny_tokenizer):
    with pytest.raises(UserError, match="n_ctx"):
        PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=2, ctx_init="a photo of a")
    m = PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=2, ctx_init=None)
    with pytest.raises(UserError, match="empty"):
        m.set_class_names([])
    other = PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=3, ctx_init=None)
    with pytest.raises(UserError, match="shape"):
        m.load_trainable_state_dict(other.trainable_state_dict())


def test_prompted_clip_documents_itself() -> None:
    """The class docstring must be the first statement of the class body (it once stood after an
    attribute, leaving ``__doc__`` None)."""
    from trainer.prompts import PromptedCLIP

    assert PromptedCLIP.__doc__ and PromptedCLIP.__doc__.startswith("A frozen open_clip CLIP")
