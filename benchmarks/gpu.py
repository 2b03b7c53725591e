"""GPU speed of issue 14: training throughput of a 152M backbone on Transfusion-style samples (and, as
sections are added, generation), printed as one markdown table.

    python benchmarks/gpu.py                   # every section at the issue's sizes (a CUDA GPU, bf16 autocast)
    python benchmarks/gpu.py --only train      # one section
    python benchmarks/gpu.py --tiny            # a tiny model and shapes: checks the script on a CPU in < 1 minute

Section "train": the backbone of the issue (hidden 1024, 12 layers, 16 heads, SwiGLU 2752, vocabulary 32,000:
151.8M parameters in its layers) with the diffusion interface on 1×R² pixel images in 2×2 patches (4 values a
token), each sample `<bos> 16 text <boi> 256 image <eoi> 16 text <eos>` = 292 tokens at batch 32, and a
1,024-token image with 14 text tokens a side = 1,056 tokens at batch 16. Synthetic batches from the real
SequenceBuilder (random ids and pixels: no download), one sample a row, the same batch every step. Each case
runs eager / compiled decoder layers (`--train.compile`) × dense boolean mask / FlexAttention block mask
(`--train.attention`): fused AdamW, gradient clipping, bf16 autocast on CUDA (float32 on CPU).

    FLOPs per step = 6·N·(B·T) + 6·D·V·M + 12·L·H·E·B·T²
N the decoder layers' parameters, B rows of T tokens, D width, V vocabulary, M labelled (text) tokens (the LM
head runs on those only), L layers, H heads, E head width; the attention term counts the full T² of scores
and values forward and backward (PaLM's MFU convention, causal halving not taken). MFU = FLOPs per second /
peak (`--peak-tflops`, default 989: H200 bf16 dense; on a CPU no MFU is given unless a peak is).

A section is a function (args) -> table rows (dicts); `SECTIONS` names them in the order they run.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmgen.config import BackboneConfig, ImageConfig, ImageTokenizerConfig, ModelConfig
from mmgen.model import MMGenModel
from mmgen.sequence import SequenceBatch, SequenceBuilder
from mmgen.train.layers import compile_layers
from mmgen.train.optim import adamw, param_groups

H200_BF16_TFLOPS = 989.0


# -- shared ---------------------------------------------------------------------------------------------


@dataclass
class SyntheticIds:
    """Special ids for the SequenceBuilder; text segments are given as ids, so nothing is encoded."""

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    boi_id: int = 3
    eoi_id: int = 4

    def encode(self, text: str) -> list[int]:
        raise TypeError("synthetic samples give their text as token ids")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_config(tiny: bool, resolution: int, max_length: int) -> ModelConfig:
    """The issue's backbone (or a tiny one) with the diffusion interface on 1×R² pixels in 2×2 patches."""
    if tiny:
        bb = BackboneConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_length)
    else:
        bb = BackboneConfig(vocab_size=32_000, hidden_size=1024, intermediate_size=2752, num_hidden_layers=12,
                            num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=max_length)
    image = ImageConfig(tokenizer=ImageTokenizerConfig(kind="pixels", resolution=resolution), patch_size=2)
    return ModelConfig(backbone=bb, image=image)


# -- section: train -------------------------------------------------------------------------------------


@dataclass
class TrainCase:
    name: str
    resolution: int  # image side: (R/2)² tokens
    text: int  # text tokens on each side of the image
    batch: int


def train_cases(tiny: bool) -> list[TrainCase]:
    if tiny:  # one case: each compiled variant costs a compilation (~20 s on a CPU)
        return [TrainCase("256-token image, 276 tokens", 32, 8, 4)]
    return [TrainCase("256-token image, 292 tokens", 32, 16, 32), TrainCase("1,024-token image, 1,056 tokens", 64, 14, 16)]


def synthetic_batch(config: ModelConfig, case: TrainCase, seed: int = 0) -> SequenceBatch:
    """B samples `<bos> text <boi> image <eoi> text <eos>` of random ids and pixels, through the SequenceBuilder."""
    g = torch.Generator().manual_seed(seed)
    ids, img = SyntheticIds(), config.image
    builder = SequenceBuilder(ids, img.channels, img.resolution, img.tokens_per_image,
                              config.backbone.max_position_embeddings)
    vocab = config.backbone.vocab_size

    def text() -> list[int]:
        return torch.randint(5, vocab, (case.text,), generator=g).tolist()

    images = torch.rand(case.batch, img.channels, img.resolution, img.resolution, generator=g) * 2 - 1
    return builder([[text(), images[i], text()] for i in range(case.batch)])


def train_flops(bb: BackboneConfig, layer_params: int, rows: int, length: int, labelled: int) -> float:
    """FLOPs of one training step (forward + backward), the formula of the module docstring."""
    dense = 6 * layer_params * rows * length + 6 * bb.hidden_size * bb.vocab_size * labelled
    attention = 12 * bb.num_hidden_layers * bb.num_attention_heads * bb.head_dim * rows * length**2
    return float(dense + attention)


def time_training(model: MMGenModel, batch: SequenceBatch, attention: str, warmup: int, steps: int) -> float:
    """Seconds per optimizer step (forward, backward, clipping, fused AdamW), after `warmup` steps."""
    device = model.device
    optimizer = adamw(param_groups(model, 0.05), 1e-4, (0.9, 0.98), 1e-8)
    noise = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        with autocast:
            out = model.loss(batch, noise, attention=attention)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def train_variant(args, case: TrainCase, compiled: bool, attention: str) -> dict:
    """One row: tokens/s, MFU and peak memory of one case with eager or compiled layers and one kernel."""
    device = torch.device(args.device)
    variant = f"{'compiled' if compiled else 'eager'}, {attention}"
    row = {"section": "train", "case": f"{case.name}, batch {case.batch}", "variant": variant}
    if attention == "flex" and device.type != "cuda":
        return {**row, "note": f"skipped: FlexAttention has no backward on {device.type}"}
    torch._dynamo.reset()  # each variant compiles for its own static shapes
    config = model_config(args.tiny, case.resolution, 2048)
    torch.manual_seed(0)
    model = MMGenModel(config).to(device)
    if compiled:
        compile_layers(model.model.layers)
    batch = synthetic_batch(config, case).to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_training(model, batch, attention, 3, args.steps)  # 3 warm-up steps: compilation, lazy set-up
    rows, length = batch.ids.shape
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    flops = train_flops(config.backbone, layer_params, rows, length, int((batch.labels >= 0).sum()))
    peak = args.peak_tflops or (H200_BF16_TFLOPS if device.type == "cuda" else 0.0)
    row.update({"tokens/s": f"{rows * length / seconds:,.0f}", "step ms": f"{seconds * 1e3:.1f}",
                "MFU": f"{flops / seconds / (peak * 1e12):.1%}" if peak else "—",
                "peak memory": f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                if device.type == "cuda" else "—"})
    print(f"train | {row['case']} | {variant}: {row['tokens/s']} tokens/s, {row['MFU']} MFU", flush=True)
    return row


def train_section(args) -> list[dict]:
    """Training tokens/s, MFU and peak memory: each case × eager / compiled layers × dense / flex attention."""
    config = model_config(args.tiny, 32, 2048)
    n = sum(p.numel() for p in MMGenModel(config).model.layers.parameters())
    print(f"train: decoder layers {n / 1e6:.1f}M parameters; {args.steps} timed steps per variant", flush=True)
    return [train_variant(args, case, compiled, attention) for case in train_cases(args.tiny)
            for compiled in (False, True) for attention in ("dense", "flex")]


# -- section: generate ----------------------------------------------------------------------------------
# The denoiser (one call = one sampling step of a 256-token image with CFG: 2 rows, the prompt's and the null
# prompt's cache) after prompts of 16 and 1,024 tokens, and batch-1 greedy decoding of 256 tokens against
# transformers' LlamaForCausalLM.generate with the same weights. Ours "eager" runs every step as plain calls
# over the preallocated cache; "captured" replays CUDA graphs (`mmgen.capture`); on a CPU the second variant
# is the same static-shape step without a graph. bf16 weights on CUDA, float32 on a CPU.


def generation_model(args, resolution: int) -> MMGenModel:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return MMGenModel(model_config(args.tiny, resolution, 2048)).to(args.device, dtype).eval()


def timed(device: torch.device, run: Callable[[], object], warmup: int, calls: int) -> tuple[float, object]:
    """Seconds per call of `run` after `warmup` calls (the first of which captures), device synchronized; and
    what the last call returned."""
    for _ in range(warmup):
        run()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        out = run()
    synchronize(device)
    return (time.perf_counter() - start) / calls, out


def peak_memory(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "—"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def ours_variants(device: torch.device) -> list[tuple[str, str]]:
    return [("ours, eager", "eager"), ("ours, captured (CUDA graph)" if device.type == "cuda"
                                       else "ours, static shapes (no graph on CPU)", "auto" if device.type == "cuda"
                                       else "static")]


@torch.no_grad()
def denoiser_rows(args) -> list[dict]:
    """ms per denoiser call (CFG) of one image after each prompt length, eager vs captured."""
    from mmgen import capture
    from mmgen.diffusion.guidance import Guidance

    device, resolution = torch.device(args.device), 16 if args.tiny else 32
    model = generation_model(args, resolution)
    ids, tokens = SyntheticIds(), model.config.image.tokens_per_image
    builder = SequenceBuilder(ids, 1, resolution, tokens, 2048)
    null = model.prefill(builder([[[ids.boi_id]]], add_eos=False))[0]
    x = torch.randn(1, 1, resolution, resolution, device=device)
    rows = []
    for prompt in (16, 128) if args.tiny else (16, 1024):
        text = torch.randint(5, 512, (prompt,)).tolist()
        for variant, mode in ours_variants(device):
            reset_peak(device)
            with capture.using(mode):
                cache = model.prefill(builder([[text + [ids.boi_id]]], add_eos=False), room=tokens)[0]
                denoise = model.image.denoiser(model, cache, Guidance(scale=3.0), null)
                sigma = torch.tensor(2.0, dtype=torch.float64, device=device)
                seconds, _ = timed(device, lambda d=denoise, s=sigma: d(x, s), 3, 25)
            rows.append({"section": "generate", "case": f"denoiser, {tokens}-token image, CFG, {prompt}-token prompt",
                         "variant": variant, "ms/call": f"{seconds * 1e3:.2f}", "peak memory": peak_memory(device)})
            print(f"generate | {rows[-1]['case']} | {variant}: {rows[-1]['ms/call']} ms", flush=True)
    return rows


def hf_llama(model: MMGenModel):
    """transformers' LlamaForCausalLM holding the same backbone weights (HF parameter names are ours)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    bb = model.config.backbone
    config = LlamaConfig(vocab_size=bb.vocab_size, hidden_size=bb.hidden_size, intermediate_size=bb.intermediate_size,
                         num_hidden_layers=bb.num_hidden_layers, num_attention_heads=bb.num_attention_heads,
                         num_key_value_heads=bb.num_key_value_heads, max_position_embeddings=bb.max_position_embeddings,
                         rms_norm_eps=bb.rms_norm_eps, rope_theta=bb.rope_theta, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    hf = LlamaForCausalLM(config).to(model.device, model.dtype).eval()
    ours = model.state_dict()
    hf.load_state_dict({k: ours[k] for k in hf.state_dict()})
    return hf


@torch.no_grad()
def decode_rows(args) -> list[dict]:
    """Batch-1 greedy decoding tokens/s: our engine eager vs captured, HF generate with its default (dynamic) and
    its static cache (compiled automatically on CUDA)."""
    from mmgen.generation import Engine, GenerationOptions

    device, new = torch.device(args.device), 32 if args.tiny else 256
    model = generation_model(args, 16)
    ids = SyntheticIds()
    engine = Engine(model, SequenceBuilder(ids, 1, 16, model.config.image.tokens_per_image, 2048))
    prompt = torch.randint(5, 512, (16,)).tolist()
    opts = GenerationOptions(max_new_tokens=new, temperature=0, max_images=0)
    hf, hf_ids = hf_llama(model), torch.tensor([[ids.bos_id] + prompt], device=device)
    runs = [(v, lambda mode=m: _ours(engine, prompt, opts, mode)) for v, m in ours_variants(device)] + [
        (f"transformers generate, {cache} cache", lambda cache=cache: _hf(hf, hf_ids, new, cache))
        for cache in ("dynamic", "static")]
    rows = []
    for variant, run in runs:
        reset_peak(device)
        seconds, tokens = timed(device, run, 2, 3)
        rows.append({"section": "generate", "case": f"greedy decoding, batch 1, {new} tokens", "variant": variant,
                     "tokens/s": f"{tokens / seconds:,.0f}", "peak memory": peak_memory(device)})
        print(f"generate | {rows[-1]['case']} | {variant}: {rows[-1]['tokens/s']} tokens/s", flush=True)
    return rows


def _ours(engine, prompt: list[int], opts, mode: str) -> int:
    """Tokens decoded (steps taken: <eos>, if the random model picks it, ends the row early)."""
    from mmgen import capture

    with capture.using(mode):
        out = engine.generate([[prompt]], opts)
    return sum(map(len, out[0])) + 1 if sum(map(len, out[0])) < opts.max_new_tokens else opts.max_new_tokens


def _hf(hf, ids: torch.Tensor, new: int, cache: str) -> int:
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)
    return out.shape[1] - ids.shape[1]


def generate_section(args) -> list[dict]:
    """Generation: denoiser ms per call and greedy decoding tokens/s, ours eager vs captured, and HF's. On a CPU
    with one thread: tiny steps on several threads mostly wait for each other (SDPA: 16 ms instead of 0.02 on a
    busy 2-core machine)."""
    threads = torch.get_num_threads()
    if args.device == "cpu":
        torch.set_num_threads(1)
        print("generate: 1 CPU thread", flush=True)
    try:
        return denoiser_rows(args) + decode_rows(args)
    finally:
        torch.set_num_threads(threads)


# -- the table --------------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {"train": train_section,
                                                                  "generate": generate_section}


def markdown(rows: list[dict]) -> str:
    """One markdown table over every row; columns in order of first appearance, '' where a row has none."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="sections to run")
    p.add_argument("--tiny", action="store_true", help="tiny model and shapes (CPU check of the script)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; --tiny: 2)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak dense TFLOP/s for MFU (default on CUDA: {H200_BF16_TFLOPS:g}, H200 bf16)")
    args = p.parse_args()
    args.steps = args.steps or (2 if args.tiny else 10)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    print(f"torch {torch.__version__} on {args.device} ({name or platform.machine()}), "
          f"{torch.get_num_threads()} CPU threads{', tiny sizes' if args.tiny else ''}", flush=True)
    rows = [row for section in args.only for row in SECTIONS[section](args)]
    print("\n" + markdown(rows))


if __name__ == "__main__":
    main()
