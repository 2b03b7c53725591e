"""Parity of the backbone with transformers' LlamaForCausalLM, loaded through the HF key map."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmgen.checkpoint import load_hf_llama, read_hf_config
from mmgen.config import ImageConfig, ModelConfig
from mmgen.model import MMGenModel
from mmgen.sequence import attention_mask


def hf_tiny(tmp_path, tied: bool, **kw) -> tuple[LlamaForCausalLM, MMGenModel]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=128, rms_norm_eps=1e-5,
        attn_implementation="sdpa", **kw,
    )
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-inits nothing we care about, but randomize norms to catch mixups
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.1)
    hf.save_pretrained(tmp_path)
    ours = MMGenModel(ModelConfig(backbone=read_hf_config(tmp_path), image=ImageConfig())).eval()
    load_hf_llama(ours, tmp_path)
    return hf, ours


def our_logits(model: MMGenModel, ids: torch.Tensor) -> torch.Tensor:
    b, t = ids.shape
    doc, img = torch.zeros(b, t, dtype=torch.long), torch.full((b, t), -1)
    pos = torch.arange(t).expand(b, t)
    hidden, _ = model(model.embed(ids, img, None), pos, doc, img)
    return model.logits(hidden)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers_llama(tmp_path, tied):
    hf, ours = hf_tiny(tmp_path, tied)
    ids = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
        got = our_logits(ours, ids)
    assert (got - ref).abs().max().item() <= 1e-5
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr() if tied else True


def test_parity_detects_the_other_rope_convention(tmp_path, monkeypatch):
    """The interleaved-pair RoPE (GPT-J / Meta original) must fail the same parity check."""
    hf, ours = hf_tiny(tmp_path, True)

    def rotate_interleaved(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    monkeypatch.setattr("mmgen.backbone.rotate_half", rotate_interleaved)
    ids = torch.randint(0, 101, (1, 40))
    with torch.no_grad():
        err = (our_logits(ours, ids) - hf(ids).logits).abs().max().item()
    assert err > 1e-3


def test_larger_vocab_keeps_hf_rows(tmp_path):
    hf, _ = hf_tiny(tmp_path, True)
    cfg = ModelConfig(backbone=read_hf_config(tmp_path))
    cfg.backbone.vocab_size = 110  # room for mmgen's special tokens
    ours = MMGenModel(cfg)
    load_hf_llama(ours, tmp_path)
    assert torch.equal(ours.model.embed_tokens.weight[:101], hf.model.embed_tokens.weight)


def test_mismatched_hf_checkpoint_is_a_clear_error(tmp_path):
    hf_tiny(tmp_path, True)
    cfg = ModelConfig(backbone=read_hf_config(tmp_path))
    cfg.backbone.num_hidden_layers = 2
    with pytest.raises(ValueError, match="num_hidden_layers"):
        load_hf_llama(MMGenModel(cfg), tmp_path)


def test_padding_query_is_never_nan():
    doc = torch.tensor([[0, 0, -1, -1]])
    img = torch.full((1, 4), -1)
    mask = attention_mask(doc, img, doc, img)
    assert mask.any(-1).all()
    assert not mask[0, 0, 1, 2] and not mask[0, 0, 3, 1]


def test_hf_checkpoint_with_other_rope_theta_or_extra_weights_is_refused(tmp_path):
    hf_tiny(tmp_path, True)
    cfg = ModelConfig(backbone=read_hf_config(tmp_path))
    cfg.backbone.rope_theta = 500_000.0
    with pytest.raises(ValueError, match="rope_theta"):
        load_hf_llama(MMGenModel(cfg), tmp_path)
    with pytest.raises(ValueError, match="attention_bias"):
        from mmgen.config import BackboneConfig

        BackboneConfig.from_hf({**LlamaConfig(attention_bias=True).to_dict()})


def test_hf_weights_that_would_be_dropped_are_refused(tmp_path):
    from safetensors.torch import save_file

    hf_tiny(tmp_path, True)
    save_file({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="o_proj.bias"):
        load_hf_llama(MMGenModel(ModelConfig(backbone=read_hf_config(tmp_path))), tmp_path)
