"""Help strings of the model keys that `mmgen train --help` lists (`mmgen.train.config.help_text`): the fields of
`mmgen.config.ModelConfig`, which carry no help metadata of their own."""

MODEL_HELP = {
    "model.backbone.vocab_size": "text vocabulary; default: the text tokenizer's size",
    "model.backbone.hidden_size": "width D of the decoder",
    "model.backbone.intermediate_size": "SwiGLU MLP width",
    "model.backbone.num_hidden_layers": "decoder layers",
    "model.backbone.num_attention_heads": "query heads",
    "model.backbone.num_key_value_heads": "key/value heads (grouped-query attention)",
    "model.backbone.head_dim": "per-head width (null: hidden_size / heads)",
    "model.backbone.max_position_embeddings": "longest sequence in tokens (also the packing row length)",
    "model.backbone.rms_norm_eps": "RMSNorm epsilon",
    "model.backbone.rope_theta": "RoPE base",
    "model.backbone.tie_word_embeddings": "share the input embedding and the LM head",
    "model.backbone.attention_bias": "q/k/v biases (Qwen2)",
    "model.backbone.qk_norm": "RMSNorm on queries and keys (Chameleon; helps stability)",
    "model.backbone.initializer_range": "std of the normal initialization",
    "model.backbone.image_experts": "image slots run through their own copy of each layer's projections, MLP and "
                                    "norms (LMFusion; set by model.freeze=text)",
    "model.backbone.image_positions": "RoPE positions of image slots: 1d (the sequence index) or 2d (M-RoPE: "
                                      "(p, p+row, p+col) for an image starting at p, text after it at p+grid; "
                                      "diffusion interface only)",
    "model.image.interface": "diffusion (Transfusion), discrete (Chameleon), hybrid (HART) or mar",
    "model.image.understanding_input": "how images the model reads enter it (causal interfaces): codes, latents "
                                       "(tokenizer latents before quantization) or encoder (a frozen vision model)",
    "model.image.understanding_encoder": "local Hugging Face vision model directory for understanding_input=encoder",
    "model.image.code_input_noise": "discrete/hybrid: up to this share of a drawn image's input codes is random "
                                    "in training (noisy teacher forcing); default: 0.2 with understanding_input "
                                    "latents/encoder, else 0",
    "model.image.patch_size": "latent cells per token along each side (unset: 1 for codes and for 2×2 grids, else "
                              "the preset's)",
    "model.image.patch_encoder": "diffusion: linear (one layer per patch) or unet (timestep-conditioned conv "
                                 "down/up blocks with skips, Transfusion §4.3; patch_size a power of two)",
    "model.image.unet_channels": "patch_encoder=unet: channels at the latent resolution (doubled per halving)",
    "model.image.unet_skips": "patch_encoder=unet: skips from the down to the up blocks (false: the decoder sees "
                              "only the tokens)",
    "model.image.tokenizer.kind": "pixels, vae, vq, hybrid or diffusers (see mmgen/config.py)",
    "model.image.tokenizer.channels": "image channels (1 grey, 3 RGB); data are converted to this",
    "model.image.tokenizer.resolution": "image side in pixels; data are resized and center-cropped to it",
    "model.image.tokenizer.latent_channels": "latent channels c per grid cell",
    "model.image.tokenizer.downsample": "pixels per latent cell along each side (f)",
    "model.image.tokenizer.codebook_size": "codes K (vq and hybrid; 0: continuous)",
    "model.image.tokenizer.width": "channels of the tokenizer's first conv stage",
    "model.image.tokenizer.res_blocks": "residual blocks per tokenizer stage",
    "model.image.tokenizer.latent_shift": "subtracted from latents before the model sees them",
    "model.image.tokenizer.latent_scale": "latents are multiplied by this (SD: 0.18215)",
    "model.image.tokenizer.path": "diffusers: local directory of the AutoencoderKL",
    "model.image.head.width": "MLP diffusion head width (mar / hybrid)",
    "model.image.head.depth": "MLP diffusion head residual blocks",
    "model.image.head.objective": "MLP head objective: eps, v or flow",
    "model.image.head.repeat": "noise levels per token per step (MAR's diffusion_batch_mul)",
    "model.image.head.steps": "MLP head sampling steps",
    "model.image.head.loss_weight": "weight of the MLP head loss",
    "model.diffusion.objective": "eps, v or flow",
    "model.diffusion.loss_weight": "λ in L = L_LM + λ·L_image",
    "model.diffusion.max_t_when_conditioning": "noise cap for an image that precedes its caption",
    "model.diffusion.t_sampling": "training noise times t (t=1 is noise): uniform, or logit_normal "
                                  "(SD3: t = sigmoid(t_mean + t_std·n), n ~ N(0,1); diffusion interface only)",
    "model.diffusion.t_mean": "logit_normal: location m (0: mass at t=0.5; > 0: noisier)",
    "model.diffusion.t_std": "logit_normal: scale s (> 0)",
    "model.diffusion.z_loss": "z-loss weight on the LM logits (1e-5 when used; 0: off)",
}
