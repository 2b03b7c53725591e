"""FlexAttention block masks from the attention rule: the same mask, outputs and gradients as the dense mask.

The batch packs several documents per row, several images per row and padding; the model uses GQA
(4 query heads, 2 key/value heads). torch 2.13 refuses FlexAttention's backward on CPU in its public
entry point although its reference (eager) path differentiates; the gradient test lifts that check
for the test only, so our block mask's gradients are compared here; the fused kernel runs on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from conftest import digit
from torch.nn.attention.flex_attention import BlockMask, create_mask

from mmgen.attention import kernel_for
from mmgen.kv_cache import KVCache
from mmgen.sequence import attention_mask, mask_mod
from mmgen.train.packing import Item, Packer


@pytest.fixture
def packed(builder, tokenizer):
    """Rows of 1-3 documents: captions before and after images, a row with two images, text only."""
    samples = [["a digit", digit(0)], [digit(1), "one"], ["two digits", digit(2), "and", digit(3)],
               ["just words here"], ["a", digit(4)], ["short"]]
    items = [Item(*builder.tokens(s)) for s in samples]
    batch = Packer(tokenizer.pad_id, 1, 8, "pack", length=48)(items).batch
    assert batch.ids.shape[0] >= 2 and (batch.doc_id.amax(1) >= 2).any()  # rows of up to 3 documents
    assert (batch.doc_id < 0).any() and len(batch.images) == 5  # padding and images
    return batch


def test_mask_mod_is_the_dense_rule(packed):
    b, t = packed.doc_id.shape
    for image_id in (packed.image_id, torch.full_like(packed.image_id, -1)):  # bidirectional / causal images
        dense = attention_mask(packed.doc_id, image_id, packed.doc_id, image_id)  # (B, 1, T, T)
        from_mod = create_mask(mask_mod(packed.doc_id, image_id), b, 1, t, t, device="cpu")  # (B, 1, T, T)
        assert torch.equal(from_mod, dense)
    assert not dense.all() and dense.diagonal(dim1=-2, dim2=-1).all()


def test_flex_is_chosen_for_uncached_chunks_only(model, packed):
    assert kernel_for("auto", torch.device("cpu")) == "dense" and kernel_for("auto", torch.device("cuda")) == "flex"
    with pytest.raises(ValueError, match="one of auto, dense, flex"):
        kernel_for("sdpa", torch.device("cpu"))
    ctx = model.context(packed.positions, packed.doc_id, packed.image_id, attention="flex")
    assert isinstance(ctx.mask, BlockMask) and ctx.mask.shape == (len(packed.ids), 1, *packed.ids.shape[1:] * 2)
    assert isinstance(model.context(packed.positions, packed.doc_id, packed.image_id, attention="auto").mask,
                      torch.Tensor)
    b, t = packed.ids.shape
    d = model.config.backbone
    kv = [(torch.zeros(b, d.num_key_value_heads, t, d.head_dim),) * 2] * d.num_hidden_layers
    cache = KVCache.filled(kv, packed.doc_id, packed.image_id, packed.positions.amax(1) + 1, images=5, room=1)
    one = torch.zeros(b, 1, dtype=torch.long)
    cached = model.context(one + cache.next_position[:, None], one, one - 1, cache, attention="flex")
    assert isinstance(cached.mask, torch.Tensor) and cached.mask.shape == (b, 1, 1, t + 1)


@torch.no_grad()
def test_flex_forward_equals_dense(model, packed):
    gen = lambda: torch.Generator().manual_seed(0)  # the same diffusion noise for both
    dense = model.loss(packed, gen(), attention="dense")
    flex = model.loss(packed, gen(), attention="flex")
    for key in ("loss", "lm_sum", "image_sum", "z"):
        torch.testing.assert_close(flex[key], dense[key], rtol=1e-5, atol=1e-5, msg=key)
    x = model.embed(packed.ids, packed.image_id, torch.randn(5, model.config.image.tokens_per_image, 48))
    hidden = {k: model.model(x, model.context(packed.positions, packed.doc_id, packed.image_id, attention=k))[0]
              for k in ("dense", "flex")}
    torch.testing.assert_close(hidden["flex"], hidden["dense"], rtol=1e-5, atol=1e-5)  # padding rows too


def test_flex_gradients_equal_dense(model, packed, monkeypatch):
    monkeypatch.setattr(flex_module, "_validate_device", lambda q, k, v: None)  # see the module docstring
    grads = {}
    for kernel in ("dense", "flex"):
        model.zero_grad(set_to_none=True)
        model.train().loss(packed, torch.Generator().manual_seed(0), attention=kernel)["loss"].backward()
        grads[kernel] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["flex"].keys() == grads["dense"].keys() and len(grads["dense"]) > 10
    for name, g in grads["dense"].items():
        torch.testing.assert_close(grads["flex"][name], g, rtol=1e-4, atol=1e-6, msg=name)
