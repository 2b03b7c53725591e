"""The accelerate training loop: one code path for one CPU, DDP over gloo (CPU) or NCCL (GPUs).

Per optimizer step each process takes its `grad_accum` micro-batches of the global batch; the
labelled-token and image counts of every micro-batch on every process are summed first, so

    loss = Σ lm_sum / Σ tokens + Σ image_sum / Σ images            (sums over the global batch)

and each process backpropagates its share times the process count (DDP averages gradients):
P processes with G/P samples each compute the gradient of one process with all G. Then gradient
clipping, the non-finite guard (skip the update, count it), fused AdamW with warmup + cosine decay,
EMA, logs, sample grids, atomic checkpoints, and at the end `save_pretrained` with the EMA weights
(what a checkpoint holds and how it is read back: `mmgen.train.state`). A step is decided on the
device and read back only at log rows, grids and checkpoints (`take_step`, `account`); the speed
options (attention kernel, compiled or checkpointed layers) are in docs/training_speed.md. In code:
`run(load_config("digits-tiny", {"train.steps": 500, "out": "runs/x"}))`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from mmgen.attention import kernel_for
from mmgen.checkpoint import load_hf_llama
from mmgen.data.sources import build_source
from mmgen.errors import ConfigError, TrainingError
from mmgen.files import WEIGHTS_FILE, atomic_write, write_json
from mmgen.model import MMGenModel
from mmgen.outputs import disk_full
from mmgen.sequence import SequenceBuilder
from mmgen.train.checkpoints import STATE, CheckpointManager, check_same_model, load_weights
from mmgen.train.config import TrainConfig, resolve_model
from mmgen.train.data import Mixture, StepBatches, TrainDataset, make_loader
from mmgen.train.freeze import adapt, merge_for_saving
from mmgen.train.layers import checkpoint_layers, compile_layers
from mmgen.train.optim import EMA, adamw, lr_at, param_groups, step_unless, trainable
from mmgen.train.overrides import to_dict
from mmgen.train.packing import PackedBatch, Packer
from mmgen.train.samples import draw_grid
from mmgen.train.state import export, restore, save_checkpoint, write_error
from mmgen.train.text_tokenizer import run_tokenizer
from mmgen.train.tokenizer import run_image_tokenizer, trains_image_tokenizer
from mmgen.train.tracking import Tracker, summary

# what `forward_backward` returns, summed over all processes, then what `take_step` adds
SUMS = ("lm_sum", "ce_sum", "z_sum", "image_sum", "model_tokens", "model_images", "samples", "tokens", "slots",
        "skipped", "truncated", "labelled", "images")
RECORD = (*SUMS, "loss", "grad_norm", "skipped_step")


class LossModule(nn.Module):
    """Routes `MMGenModel.loss` (with keyword `options`, e.g. the attention kernel) through `forward`, where
    DDP / FSDP hook in."""

    def __init__(self, model: MMGenModel, **options):
        super().__init__()
        self.model, self.options = model, options

    def forward(self, batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.model.loss(batch, generator, **self.options)


class Trainer:
    """Everything one run needs, built from a `TrainConfig`; `fit()` trains and returns the run directory."""

    def __init__(self, config: TrainConfig):
        c = self.cfg = config
        self.acc = make_accelerator(c)
        self.main, self.rank, self.world = self.acc.is_main_process, self.acc.process_index, self.acc.num_processes
        self.sharded = check_distributed(self.acc, c)  # FSDP: weights gathered for saving; no EMA
        threads = c.train.threads or (max(1, (os.cpu_count() or 1) // self.world) if self.world > 1 else 0)
        if threads:
            torch.set_num_threads(threads)
        self.out = Path(c.out)
        self.ckpts = CheckpointManager(self.out / "checkpoints", c.checkpoint.keep)
        self.resume_dir = self.ckpts.resolve(c.resume) if c.resume else None
        if not self.resume_dir:
            self.ckpts.claim_for_new_run(self.out, c.overwrite, self.main)
            self.acc.wait_for_everyone()  # nobody writes into OUT before the main process has cleared it
        self.state = json.loads((self.resume_dir / STATE).read_text()) if self.resume_dir else {}
        self._build_model_and_data()
        self.attention = check_attention(c.train.attention, self.acc.device)
        if c.train.gradient_checkpointing:
            checkpoint_layers(self.model.model.layers)
        if c.train.compile:
            compile_layers(self.model.model.layers)
        o = c.optim
        optimizer = adamw(param_groups(self.model, o.weight_decay), o.lr, o.betas, o.eps)
        options = {"attention": self.attention} if self.attention != "dense" else {}  # dense: loss's default
        self.wrapped, self.optimizer = self.acc.prepare(LossModule(self.model, **options), optimizer)
        self.names = {id(p): n for n, p in trainable(self.model).items()}
        self.ema = EMA(self.model, c.train.ema_decay) if c.train.ema_decay and self.main else None
        self.noise = torch.Generator(device=self.acc.device).manual_seed((c.seed + 1) * 1_000_003 + self.rank)
        self.step = 0
        self.counters = {"skipped_steps": 0, "skipped_items": 0, "truncated": 0, "samples_seen": 0,
                         "tokens_seen": 0, "nonfinite_in_a_row": 0}
        if self.resume_dir:
            restore(self, self.resume_dir)

    def _build_model_and_data(self) -> None:
        """Sources, text tokenizer, model (seeded; the checkpoint's weights on resume), dataset, batches."""
        from accelerate.utils import set_seed

        c = self.cfg
        model_cfg, image_tokenizer = resolve_model(c.model, load_weights=True)
        img, max_length = model_cfg.image, model_cfg.backbone.max_position_embeddings
        self.sources = [build_source(s, seed=c.seed, channels=img.channels, resolution=img.resolution,
                                     max_chars=4 * max_length, verbose=self.main) for s in c.data.sources]
        if trains_image_tokenizer(c.model, img.tokenizer):  # a vae / vq / hybrid named by kind: trained here first
            directory = run_image_tokenizer(c.image_tokenizer, img.tokenizer, self.sources, self.out,
                                            bool(self.resume_dir), self.main, self.acc.wait_for_everyone, c.seed,
                                            self.acc.device)
            section = dataclasses.replace(c.model, image_tokenizer=str(directory))
            model_cfg, image_tokenizer = resolve_model(section, load_weights=True)  # the format is unchanged
            img = model_cfg.image
        self.tokenizer = run_tokenizer(c.tokenizer, self.sources, self.out, self.resume_dir, self.main,
                                       self.acc.wait_for_everyone, c.model.init_from)
        if "vocab_size" not in c.model.backbone:
            model_cfg.backbone.vocab_size = len(self.tokenizer)
        elif model_cfg.backbone.vocab_size < len(self.tokenizer):
            raise ConfigError(f"model.backbone.vocab_size={model_cfg.backbone.vocab_size} is smaller than the text "
                              f"tokenizer ({len(self.tokenizer)} pieces); remove it to follow the tokenizer")
        if self.resume_dir:
            check_same_model(self.resume_dir, model_cfg.to_dict())
        set_seed(c.seed)  # python, numpy and torch global RNGs: the initialization, and anything else that draws
        self.model = MMGenModel(model_cfg, image_tokenizer)
        if c.model.init_from and not self.resume_dir:  # resume wins over init_from: the checkpoint started from it
            load_hf_llama(self.model, c.model.init_from)  # the appended tokens' rows: the mean of the others
        adapt(self.model, c.model, self.sharded)  # freeze=text / LoRA: text frozen, adapters trained (train/freeze.py)
        if self.resume_dir:
            load_weights(self.model, self.resume_dir / WEIGHTS_FILE)
        builder = SequenceBuilder(self.tokenizer, img.channels, img.resolution, img.tokens_per_image, max_length)
        self.mixture = Mixture([len(s) for s in self.sources], [s.weight for s in c.data.sources], c.seed,
                               c.data.epoch_size)
        self.dataset = TrainDataset(self.sources, self.mixture, builder, c.seed, c.data.max_skips, self.main)
        self.packer = Packer(self.tokenizer.pad_id, img.channels, img.resolution, c.data.packing,
                             c.data.pack_length or max_length)
        self.batches = StepBatches(len(self.dataset), c.train.batch_size, self.rank, self.world, c.train.grad_accum,
                                   0, c.train.steps)

    # -- the loop --------------------------------------------------------------------------------

    def forward_backward(self, micro: list[PackedBatch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of the global-batch loss from this process's micro-batches (left in `.grad`).

        Returns, on the device (no host synchronisation): the sums over all processes (float64, in the
        order of `SUMS`) and the global labelled-token and image counts (0-dim float32, each at least 1).
        """
        acc, dev = self.acc, self.acc.device
        local = torch.tensor([sum(m.stats["labelled"] for m in micro), sum(m.stats["images"] for m in micro)],
                             dtype=torch.float64, device=dev)
        counted = acc.reduce(local, reduction="sum")  # global counts (the packer's)
        tokens, images = counted.clamp(min=1).float().unbind()
        self.wrapped.train()
        parts = torch.zeros(6, dtype=torch.float64, device=dev)  # lm_sum, ce_sum, z_sum, image_sum, the model's counts
        for i, mb in enumerate(micro):
            sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(self.wrapped)
            with sync:
                with acc.autocast():
                    out = self.wrapped(mb.batch.to(dev), self.noise)
                loss = (out["lm_sum"] / tokens + out["image_sum"] / images) * self.world
                acc.backward(loss)
            n = out["tokens"].double()
            parts += torch.stack([out["lm_sum"].detach().double(), out["lm"].double() * n, out["z"].double() * n,
                                  out["image_sum"].detach().double(), n, out["images"].double()])
        keys = ("samples", "tokens", "slots", "skipped", "truncated")
        counts = torch.tensor([sum(m.stats[k] for m in micro) for k in keys], dtype=torch.float64, device=dev)
        return torch.cat([acc.reduce(torch.cat([parts, counts]), reduction="sum"), counted]), tokens, images

    def take_step(self, micro: list[PackedBatch], step: int) -> tuple[torch.Tensor, float]:
        """One optimizer step over this process's micro-batches, the non-finite guard decided on the device:
        a step whose loss or gradient norm is not finite leaves weights, AdamW moments and EMA as they were.
        Returns its global figures (float64 (R,), in the order of `RECORD`; read by `account`) and its lr."""
        c, acc = self.cfg, self.acc
        lr = lr_at(step, c.optim.lr, c.optim.warmup_steps, c.train.steps, c.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums, _, _ = self.forward_backward(micro)
        counts = sums[-2:].clamp(min=1)  # labelled tokens, images
        total = sums[0] / counts[0] + sums[3] / counts[1]
        clip = c.optim.grad_clip if c.optim.grad_clip > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.wrapped.parameters(), clip).double()
        if acc.scaler is not None:  # fp16: the grad scaler skips steps with inf/NaN gradients itself
            skipped = ~torch.isfinite(grad_norm)
            self.optimizer.step()
        else:
            skipped = ~(torch.isfinite(total) & torch.isfinite(grad_norm))
            step_unless(self.optimizer, skipped)
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, ~skipped)
        return torch.cat([sums, torch.stack([total, grad_norm, skipped.double()])]), lr

    def account(self, taken: list[tuple[torch.Tensor, float, int]]) -> list[dict[str, float]]:
        """Read back steps (figures, lr, step) taken since the last call (one host synchronisation) and count
        them in order as they happened: skipped-step warnings and counters, the non-finite limit (raised
        naming the step that reached it), the model's counts against the packer's. Returns each step's row."""
        c, k, rows = self.cfg, self.counters, []
        for values, (_, lr, step) in zip(torch.stack([f for f, _, _ in taken]).tolist(), taken):
            f = dict(zip(RECORD, values))
            if f["model_tokens"] != f["labelled"] or f["model_images"] != f["images"]:
                raise TrainingError(f"step {step + 1}: the model counted {f['model_tokens']:.0f} labelled tokens "
                                    f"and {f['model_images']:.0f} images, the packer {f['labelled']:.0f} and "
                                    f"{f['images']:.0f}")
            skipped = f["skipped_step"] > 0
            if skipped and self.main:
                print(f"warning: step {step + 1}: non-finite loss ({f['loss']:.4g}) or gradient norm "
                      f"({f['grad_norm']:.4g}); update skipped ({k['skipped_steps'] + 1} so far)",
                      file=sys.stderr, flush=True)
            k["skipped_steps"] += int(skipped)
            k["nonfinite_in_a_row"] = k["nonfinite_in_a_row"] + 1 if skipped else 0
            for key, field in (("skipped_items", "skipped"), ("truncated", "truncated"),
                               ("samples_seen", "samples"), ("tokens_seen", "tokens")):
                k[key] += int(f[field])
            if c.train.max_nonfinite and k["nonfinite_in_a_row"] >= c.train.max_nonfinite:
                raise TrainingError(f"{k['nonfinite_in_a_row']} steps in a row had a non-finite loss or gradient "
                                    f"(step {step + 1}); lower optim.lr, set model.backbone.qk_norm=true or "
                                    "model.diffusion.z_loss=1e-5, or use bf16 instead of fp16")
            tokens, images = max(f["labelled"], 1.0), max(f["images"], 1.0)
            rows.append({"loss": f["loss"], "lm": f["ce_sum"] / tokens, "z": f["z_sum"] / tokens,
                         "image": f["image_sum"] / images, "grad_norm": f["grad_norm"], "lr": lr,
                         "skipped": float(skipped), "samples": f["samples"], "tokens": f["tokens"],
                         "slots": f["slots"]})
        return rows

    def train_step(self, micro: list[PackedBatch], step: int) -> dict[str, float]:
        """One optimizer step, read back at once (`take_step`, then `account`); returns its global figures."""
        return self.account([(*self.take_step(micro, step), step)])[0]

    def fit(self) -> Path:
        """Train from the current step to `train.steps`; checkpoint, log, sample; export; return OUT.
        A full disk raises `OutputError` naming the newest checkpoint, which is intact."""
        c, total, start = self.cfg, self.cfg.train.steps, self.step
        try:
            self._steps(start, total)
        except OSError as e:  # a full disk while writing the config, logs or grids (checkpoints say so themselves)
            if not disk_full(e):
                raise
            raise write_error(self, e, f"the run's files in {self.out}") from None
        if start >= total and self.main:
            print(f"{self.resume_dir} is already at step {total}: nothing to train; exporting")
        self.ema = merge_for_saving(self.model, self.ema)  # adapters (if any) folded into plain weights
        export(self)
        if c.eval.digits and self.main:
            self.evaluate()
        self.acc.wait_for_everyone()
        return self.out

    def _steps(self, start: int, total: int) -> None:
        """The loop of `fit`: steps `start` to `total`, with logs, sample grids and checkpoints. Steps are read
        back (`account`: the one host synchronisation) only where a log row, grid or checkpoint needs them."""
        c = self.cfg
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "train_config.yaml", yaml.safe_dump(to_dict(c), sort_keys=False))
            self._announce()
        tracker = Tracker(self.out, c.log, to_dict(c), start if self.resume_dir else None, self.main)
        self.batches.start = start
        loader = iter(make_loader(self.dataset, self.batches, self.packer, c.data.num_workers))
        bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True,
                   disable=not (self.main and c.log.progress))
        taken: list[tuple[torch.Tensor, float, int]] = []  # steps not read back yet
        window: list[dict] = []  # steps read back, not logged yet
        seconds, t0 = 0.0, time.perf_counter()
        try:
            for step in range(start, total):
                micro = [next(loader) for _ in range(c.train.grad_accum)]
                taken.append((*self.take_step(micro, step), step))
                self.step = step + 1
                bar.update(1)
                log = self.step % c.log.every == 0 or self.step == total
                grid = c.samples.every and c.samples.prompts and (self.step % c.samples.every == 0 or self.step == total)
                save = (c.checkpoint.every and self.step % c.checkpoint.every == 0) or self.step == total
                if not (log or grid or save):
                    continue  # no host synchronisation between these points
                window += self.account(taken)
                taken, seconds = [], seconds + time.perf_counter() - t0
                if log:
                    row = self._row(window, seconds)
                    window, seconds = [], 0.0
                    tracker.log(row)
                    if self.main:
                        bar.write(summary(row, total)) if not bar.disable else print(summary(row, total), flush=True)
                if grid:
                    self.sample_grid()
                if save:
                    save_checkpoint(self)
                t0 = time.perf_counter()
        finally:
            bar.close()
            tracker.close()

    def _row(self, window: list[dict], seconds: float) -> dict:
        """The log row of the steps in `window`, which took `seconds` of wall-clock."""
        n = len(window)
        mean = {k: sum(r[k] for r in window) / n for k in ("loss", "lm", "image", "z", "grad_norm")}
        tokens, slots = sum(r["tokens"] for r in window), sum(r["slots"] for r in window)
        return {"step": self.step, "epoch": self.batches.epoch_of(self.step - 1), **mean, "lr": window[-1]["lr"],
                "tokens_per_s": tokens / max(seconds, 1e-9), "padding": 1 - tokens / max(slots, 1),
                "samples": int(sum(r["samples"] for r in window)), "tokens": int(tokens),
                "skipped_steps": self.counters["skipped_steps"], "skipped_items": self.counters["skipped_items"],
                "truncated": self.counters["truncated"], "seconds": seconds}

    def _announce(self) -> None:
        c, m = self.cfg, self.model
        src = ", ".join(f"{s.name} ({len(s)}{f', {s.dropped} dropped' if s.dropped else ''}; weight {w.weight:g})"
                        for s, w in zip(self.sources, c.data.sources))
        print(f"mmgen train: {m.num_parameters(trainable_only=True) / 1e6:.2f}M trainable parameters "
              f"({c.model.preset} preset, {m.config.image.interface} interface); {self.world} process(es) on "
              f"{self.acc.device}, {torch.get_num_threads()} thread(s) each; global batch {c.train.batch_size} = "
              f"{self.world} × {c.train.grad_accum} × {self.batches.micro}; steps {self.step} -> {c.train.steps} "
              f"({self.batches.steps_per_epoch} per epoch); data: {src}; packing {c.data.packing}; out: {self.out}"
              + (f"; resuming from {self.resume_dir}" if self.resume_dir else ""), flush=True)
        on = [k for k in ("gradient_checkpointing", "compile") if getattr(c.train, k)]
        print(f"speed: attention {self.attention}, fused AdamW{''.join(', ' + k for k in on)}", flush=True)
        if c.train.compile:
            print("compiling the decoder layers with torch.compile… (the first steps are slow)", flush=True)

    # -- side outputs ----------------------------------------------------------------------------

    def sample_grid(self) -> None:
        """A PNG grid (one row per prompt) drawn with the EMA weights, on the main process."""
        if self.main:  # compiled layers run eagerly here: the cached decoding shapes would only recompile them
            with torch.compiler.set_stance("force_eager"):
                draw_grid(self.model, self.tokenizer, self.ema, self.cfg.samples,
                          self.out / "samples" / f"step_{self.step:08d}.png")

    def evaluate(self) -> dict:
        """The bundled digits evaluation of the exported model: prompted-class and caption accuracy."""
        from mmgen.evaluation import evaluate_digits
        from mmgen.generation import GenerationOptions

        e = self.cfg.eval
        print(f"evaluating: {e.digits} images per digit, then captions of the held-out digits", flush=True)
        options = GenerationOptions(image_steps=e.image_steps or None, guidance=e.guidance)
        results = evaluate_digits(self.out, e.digits, options, grid=self.out / "digits_grid.png")
        write_json(self.out / "eval.json", results)
        print(json.dumps(results, indent=2), flush=True)
        return results


def make_accelerator(c: TrainConfig):
    """accelerate's `Accelerator` for this run (on every process), DDP with unused parameters allowed."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Several processes and no GPU: accelerate needs cpu=True to join them over gloo (otherwise each
    # process silently trains alone).
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    cpu = not gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1
    acc = Accelerator(cpu=cpu, mixed_precision=c.train.mixed_precision,
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    precision = c.train.mixed_precision
    if precision != "no" and not acc.native_amp and acc.is_main_process:
        print(f"warning: {precision} autocast is not available on {acc.device} (accelerate turns it off); training "
              "in float32" + (" — use bf16 on CPUs" if precision == "fp16" else ""), file=sys.stderr)
    return acc


def check_attention(setting: str, device: torch.device) -> str:
    """The kernel `train.attention` resolves to on `device` (`mmgen.attention.kernel_for`); flex trains on CUDA only."""
    kernel = kernel_for(setting, device)
    if kernel == "flex" and device.type != "cuda":
        raise ConfigError(f"train.attention=flex: FlexAttention has no backward pass on {device.type} in torch "
                          f"{torch.__version__.split('+')[0]}; use --train.attention=auto (flex on CUDA, dense "
                          "elsewhere) or dense")
    return kernel


def check_distributed(acc, c: TrainConfig) -> bool:
    """True under FSDP (sharded weights); raises for what this loop does not support (see docs/training.md)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise TrainingError("DeepSpeed is not supported by mmgen's loop: its engine steps inside backward, which "
                            "bypasses the global loss normalization's accumulation and the non-finite guard; use "
                            "DDP or FSDP (docs/training.md)")
    if acc.distributed_type != DistributedType.FSDP:
        return False
    if c.train.ema_decay:
        raise ConfigError("train.ema_decay: EMA of FSDP-sharded weights is not implemented; set --train.ema_decay=0")
    if c.samples.every:
        raise ConfigError("samples.every: sample grids need the full weights on one process; set --samples.every=0 "
                          "under FSDP")
    return True


def run(config: TrainConfig) -> Path:
    """Train as `config` says and return the run directory (final model, logs, checkpoints)."""
    return Trainer(config).fit()
