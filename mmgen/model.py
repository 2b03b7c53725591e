"""The unified model: token embeddings + image interface + LLaMA backbone + LM head; losses.

Top-level parameter names are Hugging Face's (`model.layers.*`, `lm_head.weight`), so an HF Llama
checkpoint fills the backbone directly. The image interface (`mmgen.interfaces`, chosen by
`config.image.interface`) lives under `image.*`; the frozen image tokenizer under `image_tokenizer.*`.

Shapes: B batch, T tokens, D hidden, N images in the batch, L tokens per image, P patch dim, V vocab.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgen import capture
from mmgen.attention import block_mask, kernel_for
from mmgen.backbone import AttentionContext, LlamaModel
from mmgen.config import ModelConfig
from mmgen.files import TOKENIZER_DIGEST, load_directory, save_directory
from mmgen.interfaces.registry import build_interface
from mmgen.interfaces.understanding import carried_files, use_carried_files
from mmgen.kv_cache import KVCache
from mmgen.positions import advance, chunk_positions, next_position, sequence_positions
from mmgen.sequence import IGNORE, SequenceBatch, attention_mask, mask_mod
from mmgen.tokenizers.image import ImageTokenizer, ImageTokens, build_image_tokenizer


class MMGenModel(nn.Module):
    """Args:
        config: the whole model (backbone, image interface and tokenizer, diffusion objective).
        image_tokenizer: a trained image tokenizer whose config equals `config.image.tokenizer`
            (see `mmgen.tokenizers.image.load_image_tokenizer`); by default a fresh one is built
            from the config (the identity for "pixels"; trained weights then come from a checkpoint).
    """

    def __init__(self, config: ModelConfig, image_tokenizer: ImageTokenizer | None = None):
        super().__init__()
        self.config = config
        bb = config.backbone
        self.model = LlamaModel(bb)
        self.lm_head = nn.Linear(bb.hidden_size, bb.vocab_size, bias=False)
        self.image = build_interface(config)
        self.apply(self._init_weights)
        self.image.init_weights()  # interface-specific: zero outputs, the MLP head's adaLN-Zero
        if bb.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if image_tokenizer is None:
            image_tokenizer = build_image_tokenizer(config.image.tokenizer)
        elif image_tokenizer.config != config.image.tokenizer:
            a, b = dataclasses.asdict(image_tokenizer.config), dataclasses.asdict(config.image.tokenizer)
            diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
            raise ValueError(
                "the image tokenizer does not match the model's configuration "
                f"(field: (tokenizer, model config)) {diff}; build the config with "
                "ImageConfig(tokenizer=image_tokenizer.config, ...)"
            )
        self.image_tokenizer = image_tokenizer.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> MMGenModel:
        super().train(mode)
        self.image_tokenizer.eval()  # frozen: never in training mode (no codebook updates)
        return self

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.backbone.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.requires_grad:  # frozen: pretrained
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def num_parameters(self, trainable_only: bool = False) -> int:
        params = {id(p): p for p in self.parameters() if p.requires_grad or not trainable_only}
        return sum(p.numel() for p in params.values())

    # -- images <-> tokens -------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> ImageTokens:
        """Pixels (N, C, H, W) in [-1, 1] -> image tokens, through the frozen tokenizer."""
        if len(images) == 0:
            return ImageTokens()
        return self.image_tokenizer.encode(images)

    @torch.no_grad()
    def decode_images(self, tokens: ImageTokens) -> Tensor:
        """Image tokens -> pixels (N, C, H, W) in [-1, 1]."""
        return self.image_tokenizer.decode(tokens).float().clamp(-1, 1)

    def read_images(self, images: Tensor) -> Tensor:
        """Slot embeddings (N, L, D) of clean images (N, C, H, W) the model reads: through the interface's
        understanding input (`mmgen.interfaces.understanding`) if it has one, else `embed` of their tokens."""
        if self.image.understanding is None:
            return self.image.embed(self.encode_images(images))
        return self.image.understanding(images.to(self.device), self.image_tokenizer)

    def embed_drawn(self, tokens: ImageTokens) -> Tensor:
        """Slot embeddings (R, L, D) of drawn images for the clean pass: what later text attends to is what it
        would be had the decoded image been given (decode, then the understanding input), or `embed(tokens)`."""
        if self.image.understanding is None:
            return self.image.embed(tokens)
        return self.read_images(self.decode_images(tokens))

    def train_image_inputs(self, images: Tensor, conditions: Tensor, generator: torch.Generator | None):
        """Training inputs (N, L, D) and the interface's targets for images (N, C, H, W): the interface's
        `train_inputs`, except that images that precede their text (`conditions` (N,)) are read through
        the understanding input when the interface has one."""
        inputs, targets = self.image.train_inputs(self.encode_images(images), conditions, generator)
        read = conditions.to(images.device).nonzero().flatten()  # (n_read,)
        if self.image.understanding is not None and len(read):
            inputs = inputs.index_put((read,), self.read_images(images[read]).to(inputs.dtype))
        return inputs, targets

    # -- forward ---------------------------------------------------------------------------------

    def embed(self, ids: Tensor, image_id: Tensor | None = None, image_tokens: Tensor | None = None) -> Tensor:
        """Token embeddings (B, T, D), with slots where image_id >= 0 filled from image_tokens (N, L, D)
        in reading order. Without image_id the ids are text only (a decode step: nothing to check and
        no device read); with it the slot count is checked against the image tokens."""
        x = self.model.embed_tokens(ids)
        if image_id is None:
            return x
        slots = image_id >= 0
        given = 0 if image_tokens is None else image_tokens.shape[0] * image_tokens.shape[1]
        found = int(slots.sum())
        if found != given:
            raise ValueError(f"the sequence has {found} image slots but {given} image token(s) were given "
                             f"({'none' if image_tokens is None else tuple(image_tokens.shape[:2])}); "
                             "build it with SequenceBuilder and pass its images' tokens")
        return x.masked_scatter(slots[..., None], image_tokens.to(x.dtype)) if given else x

    def context(self, positions: Tensor, doc_id: Tensor, image_id: Tensor, cache: KVCache | None = None,
                attention: str = "dense") -> AttentionContext:
        """The backbone's attention context for a chunk (B, T) after `cache` (if any): the attention
        rule of `mmgen.sequence` (images attend bidirectionally inside themselves unless the interface
        is causal), rotary positions, and the cache.

        Args:
            positions: without a cache, the sequence positions (B, T) of whole documents (`SequenceBatch`),
                mapped here by `rope_positions`; after a cache, RoPE positions (`chunk_positions`).
            attention: the kernel of an uncached chunk (`mmgen.attention.kernel_for`): "dense" (a boolean
                mask), "flex" (a FlexAttention block mask built once here; CUDA for training) or "auto"
                (flex on CUDA, dense elsewhere). A chunk after a cache always takes the dense mask.
        """
        max_pos = self.config.backbone.max_position_embeddings
        real = positions[doc_id >= 0] if cache is None else None  # cached chunks: kept in range by the engine
        if real is not None and real.numel() and real.max().item() >= max_pos:  # (a per-step device read spared)
            raise ValueError(
                f"sequence reaches position {real.max().item()}, over the model's maximum of {max_pos} tokens"
            )
        if cache is None:  # a whole sequence: its sequence positions become RoPE positions here
            positions = self.rope_positions(positions, image_id)
        causal = self.image.causal  # causal interfaces: images attend like text
        q_img = torch.full_like(image_id, -1) if causal else image_id
        if cache is not None and cache.length:
            k_doc = torch.cat([cache.doc_id, doc_id], 1)
            k_img = torch.full_like(k_doc, -1) if causal else torch.cat([cache.image_id, image_id], 1)
            mask = attention_mask(doc_id, q_img, k_doc, k_img, offset=cache.length)
        elif kernel_for(attention, doc_id.device) == "flex":
            mask = block_mask(mask_mod(doc_id, q_img), *doc_id.shape, doc_id.device)
        else:
            mask = attention_mask(doc_id, q_img, doc_id, q_img)
        return self.model.context(positions, mask, cache, image_id >= 0)  # image slots: the image experts'

    def forward(
        self, x: Tensor, positions: Tensor, doc_id: Tensor, image_id: Tensor, cache: KVCache | None = None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Backbone over embeddings x (B, T, D); cached keys (if any) come first.

        Returns hidden states (B, T, D) and per-layer keys/values over cache + chunk.
        """
        return self.model(x, self.context(positions, doc_id, image_id, cache))

    # -- RoPE positions (mmgen.positions) --------------------------------------------------------

    def rope_positions(self, positions: Tensor, image_id: Tensor) -> Tensor:
        """Sequence positions (B, T) of whole documents and their image slots (B, T) -> RoPE positions:
        (B, T) under backbone.image_positions "1d" (unchanged), (B, T, 3) under "2d"."""
        return sequence_positions(positions, image_id, self.config.image.grid, self.config.backbone.image_positions)

    def chunk_positions(self, start: Tensor, length: int, image: bool) -> Tensor:
        """RoPE positions (B, T) or (B, T, 3) of a chunk of `length` tokens after a cache, each row's first at
        `start` (B,); `image`: the chunk is one image (for the causal interfaces, one of its tokens)."""
        return chunk_positions(start, length, self.config.backbone.image_positions,
                               self.config.image.grid if image else None)

    # -- the KV cache during generation ----------------------------------------------------------

    @torch.no_grad()
    def prefill(self, batch: SequenceBatch, room: int = 0) -> tuple[KVCache, Tensor]:
        """Run prompts (images in them clean) into a fresh cache with capacity for `room` more slots (size it
        from the request, and decoding never grows it); returns it and each row's last hidden state (B, D)."""
        images = batch.images.shape[0]
        batch = batch.to(self.device)
        tokens = self.read_images(batch.images) if images else None
        hidden, kv = self(self.embed(batch.ids, batch.image_id, tokens), batch.positions, batch.doc_id, batch.image_id)
        lengths = (batch.doc_id >= 0).sum(1)  # (B,)
        after = next_position(self.rope_positions(batch.positions, batch.image_id), lengths)  # (B,)
        cache = KVCache.filled(kv, batch.doc_id, batch.image_id, after, images, room)
        return cache, hidden[torch.arange(len(lengths), device=hidden.device), lengths - 1]

    @torch.no_grad()
    def extend(self, cache: KVCache, x: Tensor, active: Tensor, image: bool) -> Tensor:
        """Write embeddings x (B, T, D) into the cache in place for the `active` rows (B,) (others get empty
        slots) and return their hidden states (B, T, D). `image` marks the chunk as one image. No device
        value is read, and single-token steps are captured on CUDA (`mmgen.capture`)."""
        b, t, _ = x.shape
        doc = torch.where(active, 0, -1)[:, None].expand(b, t)  # (B, T)
        image_id = torch.where(doc >= 0, cache.images, -1) if image else torch.full_like(doc, -1)  # (B, T)
        positions = self.chunk_positions(cache.next_position, t, image)  # (B, T) or (B, T, 3)
        real = (doc >= 0).view(b, t, *[1] * (positions.dim() - 2))  # (B, T) or (B, T, 1)
        positions = torch.where(real, positions, 0)  # masked slots of finished rows take no position
        hidden = capture.run(self.model, x, self.context(positions, doc, image_id, cache))
        mode, grid = self.config.backbone.image_positions, self.config.image.grid if image else None
        cache.commit(doc, image_id, active.long() * advance(t, mode, grid), image)
        return hidden

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)

    # -- training --------------------------------------------------------------------------------

    def loss(self, batch: SequenceBatch, generator: torch.Generator | None = None, attention: str = "dense"
             ) -> dict[str, Tensor]:
        """L = L_LM + λ·L_image on one batch (DESIGN §4); `attention` picks the kernel (see `context`).

        Returns differentiable sums and their counts, so a data-parallel trainer can normalize by
        global counts (total = lm_sum / Σtokens + image_sum / Σimages), and the local means:
            loss:      lm_sum / tokens + image_sum / images (differentiable)
            lm_sum:    Σ over labelled tokens of cross-entropy (+ z_loss · z²)
            image_sum: Σ over images of that image's weighted loss (λ·MSE for diffusion); with an
                       understanding input, the images it reads (those before their text) add 0
            tokens, images: the counts (int64 scalars)
            lm, image, z: detached means, for logging
        """
        cfg = self.config.diffusion
        n = batch.images.shape[0]
        inputs, ctx = None, None
        if n:
            inputs, ctx = self.train_image_inputs(batch.images.to(self.device), batch.image_conditions,
                                                  generator)  # (N, L, D)
        x = self.embed(batch.ids, batch.image_id, inputs)
        rule = self.context(batch.positions, batch.doc_id, batch.image_id, attention=attention)
        hidden, _ = self.model(x, rule)

        labelled = batch.labels != IGNORE
        logits = self.logits(hidden[labelled]).float()  # (M, V)
        ce = F.cross_entropy(logits, batch.labels[labelled], reduction="none")  # (M,)
        z = logits.logsumexp(-1).pow(2)  # (M,)
        lm_sum = (ce + cfg.z_loss * z).sum()
        if n:
            slots = batch.image_id >= 0
            before = torch.zeros_like(slots)
            before[:, :-1] = slots[:, 1:]  # <boi> and slots 0..L-2: the positions that predict slots
            size = (n, self.config.image.tokens_per_image, hidden.shape[-1])
            per_image = self.image.loss(ctx, hidden[slots].view(size), hidden[before].view(size), generator)  # (N,)
            if self.image.understanding is not None:  # images read through it are inputs, not targets (Janus)
                per_image = torch.where(batch.image_conditions.to(per_image.device), 0.0, per_image)  # (N,)
        else:
            per_image = hidden.new_zeros(0)
        image_sum = per_image.sum()  # interfaces weight their own losses (λ for diffusion)
        tokens_n, images_n = labelled.sum(), torch.tensor(n, device=hidden.device)
        total = lm_sum / tokens_n.clamp(min=1) + image_sum / images_n.clamp(min=1)
        return {
            "loss": total, "lm_sum": lm_sum, "image_sum": image_sum, "tokens": tokens_n, "images": images_n,
            "lm": (ce.sum() / tokens_n.clamp(min=1)).detach(),
            "image": (per_image.sum() / images_n.clamp(min=1)).detach(),
            "z": (z.sum() / tokens_n.clamp(min=1)).detach(),
        }

    # -- persistence (see mmgen.files) -----------------------------------------------------------

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """Write model.safetensors, the text tokenizer's files (when one is given: see
        `mmgen.tokenizers.text_contract`), then config.json, each atomically. The weights' header records the
        tokenizer's digest (`TOKENIZER_DIGEST`), so loading can tell that the two belong together. A frozen
        vision encoder (understanding_input "encoder") travels too: its weights in model.safetensors, its
        Hugging Face config in `understanding_encoder.json`."""
        extra = carried_files(self.image.understanding)
        if tokenizer is None:
            save_directory(directory, self.config.to_dict(), self, extra)
            return
        save_directory(directory, self.config.to_dict(), self, {**extra, **tokenizer.files()},
                       metadata={TOKENIZER_DIGEST: tokenizer.digest()})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None) -> MMGenModel:
        """Rebuild a model saved by `save_pretrained`, in eval mode, its weights cast to `dtype` ("bf16", "fp16",
        "fp32" or a torch dtype; None: as stored). Norms, softmax, RoPE angles and sampling stay float32 inside.
        Every file is checked first: a missing one raises FileNotFoundError; a config.json of wrong keys, types or
        values, or a model.safetensors that is corrupt or of another model, raises ModelFileError naming the file,
        the field or tensors, and the fix; an unknown dtype raises OptionError."""
        return load_directory(directory, lambda raw: cls(ModelConfig.from_dict(use_carried_files(raw, directory))),
                              device, dtype=dtype)
