"""Sequence layout, labels, the attention rule (brute force and by perturbation), bad input."""

import pytest
import torch
from conftest import digit

from mmgen.sequence import IGNORE, attention_mask


def test_layout_and_labels(builder, tokenizer):
    img = digit()
    b = builder([["a digit", img, "seven"], [img, "four"]])
    L = 16
    row = b.ids[0].tolist()
    text = tokenizer.encode("a digit")
    boi = 1 + len(text)
    assert row[0] == tokenizer.bos_id and row[boi] == tokenizer.boi_id and row[boi + L + 1] == tokenizer.eoi_id
    assert (b.image_id[0, boi + 1 : boi + 1 + L] == 0).all() and (b.image_id[1] == 1).sum() == L
    # no LM loss from or onto image slots; <boi> is predicted; <eoi> is not (it is forced)
    assert b.labels[0, boi - 1] == tokenizer.boi_id
    assert (b.labels[0, boi : boi + L + 1] == IGNORE).all()
    assert b.labels[0, boi + L + 1] == tokenizer.encode("seven")[0]
    # padding: no label, no document, positions stop growing
    n1 = (b.doc_id[1] >= 0).sum().item()
    assert (b.doc_id[1, n1:] == -1).all() and (b.labels[1, n1 - 1 :] == IGNORE).all()
    assert b.image_conditions.tolist() == [False, True]
    # positions are pinned to 1-D RoPE over the sequence: image slots count like any token
    n0 = (b.doc_id[0] >= 0).sum().item()
    assert torch.equal(b.positions[0, :n0], torch.arange(n0))  # only the image before its caption is capped


def test_special_text_stays_text(builder, tokenizer):
    b = builder([["draw <boi> and <eoi> please"]])
    assert (b.ids == tokenizer.boi_id).sum() == 0 and (b.ids == tokenizer.eoi_id).sum() == 0
    assert (b.image_id >= 0).sum() == 0


def brute_force_mask(doc, img):
    b, t = doc.shape
    out = torch.zeros(b, 1, t, t, dtype=torch.bool)
    for r in range(b):
        for q in range(t):
            for k in range(t):
                same_doc = doc[r, q] == doc[r, k] and doc[r, k] >= 0
                same_img = img[r, q] == img[r, k] and img[r, k] >= 0
                out[r, 0, q, k] = (same_doc and (k <= q or same_img)) or q == k
    return out


def test_mask_matches_the_rule(builder):
    img = digit()
    b = builder([["one", img, "two", img], [img, "three"]])
    assert torch.equal(attention_mask(b.doc_id, b.image_id, b.doc_id, b.image_id), brute_force_mask(b.doc_id, b.image_id))
    # a chunk of queries [s, e) over keys [0, e) gives the same rows
    s = 7
    chunk = attention_mask(b.doc_id[:, s:], b.image_id[:, s:], b.doc_id, b.image_id, offset=s)
    assert torch.equal(chunk, brute_force_mask(b.doc_id, b.image_id)[:, :, s:])


def hidden_states(model, batch, images):
    t = torch.full((images.shape[0],), 0.3)
    tokens = model.image.embed_patches(images, t)[0]
    h, _ = model(model.embed(batch.ids, batch.image_id, tokens), batch.positions, batch.doc_id, batch.image_id)
    return h


@torch.no_grad()
def test_perturbing_a_late_image_token(model, builder):
    b = builder([["a digit", digit(0), "seven"], ["other", digit(1)]])
    h0 = hidden_states(model, b, b.images)
    images = b.images.clone()
    images[0, :, 6:, 6:] += 0.5  # the last 2×2 patch of image 0
    h1 = hidden_states(model, b, images)
    changed = (h1 - h0).abs().amax(-1) > 1e-6  # (B, T)
    slots = (b.image_id[0] == 0).nonzero().flatten()
    boi = slots[0].item() - 1
    assert changed[0, slots[:-1]].all(), "earlier tokens of the same image must see the later token"
    assert not changed[0, : boi + 1].any(), "nothing before <boi> may change"
    assert changed[0, slots[-1] + 1 :][b.doc_id[0, slots[-1] + 1 :] >= 0].all(), "text after the image sees it"
    assert not changed[1].any(), "another sample never changes"


@torch.no_grad()
def test_perturbation_under_a_cache(model, builder):
    """Same rule for an image chunk run against a cached prefix."""
    b = builder([["a digit", digit(0)], ["other text here", digit(1)]])
    first_slot = (b.image_id >= 0).float().argmax(1)  # (B,)
    boi = [builder.tok.boi_id]
    prefix = builder([["a digit", boi], ["other text here", boi]], add_eos=False)  # ends in <boi>

    def run(images):
        cache, _ = model.prefill(prefix)
        tokens = model.image.embed_patches(images, torch.full((2,), 0.3))[0]
        return model.extend(cache, tokens, torch.tensor([True, True]), image=True)

    h0 = run(b.images)
    images = b.images.clone()
    images[0, :, 6:, 6:] -= 0.5
    h1 = run(images)
    changed = (h1 - h0).abs().amax(-1) > 1e-6  # (B, L)
    assert changed[0, :-1].all() and not changed[1].any()
    # and the chunk equals the uncached forward on the full sequence
    full = hidden_states(model, b, b.images)
    for r in range(2):
        s = first_slot[r].item()
        torch.testing.assert_close(h0[r], full[r, s : s + 16], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "image, match",
    [
        (torch.zeros(1, 16, 16), "shape"),
        (torch.zeros(3, 8, 8), "shape"),
        (torch.zeros(1, 8, 8, dtype=torch.uint8), "dtype"),
        (torch.full((1, 8, 8), float("nan")), "NaN"),
        (torch.full((1, 8, 8), float("inf")), "NaN or inf"),
        (torch.full((1, 8, 8), 255.0), r"\[-1, 1\]"),
        ("not an image".encode(), "torch.Tensor"),
    ],
)
def test_bad_images_are_named(builder, image, match):
    with pytest.raises((ValueError, TypeError), match=match):
        builder([["a digit", image]])


def test_empty_and_overlong_samples(builder):
    with pytest.raises(ValueError, match="empty sample"):
        builder([[]])
    with pytest.raises(ValueError, match="empty sample"):
        builder([["", ""]])
    with pytest.raises(ValueError, match="empty batch"):
        builder([])
    with pytest.raises(ValueError, match="maximum"):
        builder([["seven " * 200]])
