"""The accelerate training loop: one code path for one CPU, DDP over gloo (CPU) or NCCL (GPUs).

Per optimizer step each process takes its `grad_accum` micro-batches of the global batch; the
labelled-token and image counts of every micro-batch on every process are summed first, so

    loss = Σ lm_sum / Σ tokens + Σ image_sum / Σ images            (sums over the global batch)

and each process backpropagates its share times the process count (DDP averages gradients):
P processes with G/P samples each compute the gradient of one process with all G. Then gradient
clipping, the non-finite guard (skip the update, count it), AdamW with warmup + cosine decay, EMA,
logs, sample grids, atomic checkpoints, and at the end `save_pretrained` with the EMA weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_model
from torch import nn
from tqdm.auto import tqdm

from mmgen.data.sources import build_source
from mmgen.model import MMGenModel
from mmgen.sequence import SequenceBuilder
from mmgen.tokenizers.text import FILENAME as TOKENIZER_FILE
from mmgen.tokenizers.text import TextTokenizer
from mmgen.train.checkpoints import (STATE, CheckpointError, CheckpointManager, capture_rng, check_same_model,
                                     fsync_file, load_weights, read_tensors, restore_rng, write_json, write_tensors)
from mmgen.train.config import TrainConfig, resolve_model
from mmgen.train.data import Mixture, StepBatches, TrainDataset, corpus, make_loader
from mmgen.train.optim import EMA, load_optimizer_state, lr_at, optimizer_state, param_groups, trainable
from mmgen.train.overrides import ConfigError, to_dict
from mmgen.train.packing import PackedBatch, Packer
from mmgen.train.samples import draw_grid
from mmgen.train.tracking import Tracker, summary


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says what to try."""


class LossModule(nn.Module):
    """Routes `MMGenModel.loss` through `forward`, where DDP / FSDP hook in."""

    def __init__(self, model: MMGenModel):
        super().__init__()
        self.model = model

    def forward(self, batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.model.loss(batch, generator)


class Trainer:
    """Everything one run needs, built from a `TrainConfig`; `fit()` trains and returns the run directory."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        c = self.cfg = config
        # Several processes and no GPU: accelerate needs cpu=True to join them over gloo (otherwise each
        # process silently trains alone).
        gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
        cpu = not gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.acc = Accelerator(cpu=cpu, mixed_precision=c.train.mixed_precision,
                               kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.main, self.rank, self.world = self.acc.is_main_process, self.acc.process_index, self.acc.num_processes
        self.sharded = check_distributed(self.acc, c)  # FSDP: weights gathered for saving; no EMA
        if c.train.mixed_precision != "no" and not self.acc.native_amp and self.main:
            print(f"warning: {c.train.mixed_precision} autocast is not available on {self.acc.device} (accelerate "
                  "turns it off); training in float32" + (" — use bf16 on CPUs" if c.train.mixed_precision == "fp16"
                                                          else ""), file=sys.stderr)
        threads = c.train.threads or (max(1, (os.cpu_count() or 1) // self.acc.num_processes) if self.world > 1 else 0)
        if threads:
            torch.set_num_threads(threads)
        self.out = Path(c.out)
        self.ckpts = CheckpointManager(self.out / "checkpoints", c.checkpoint.keep)
        self.resume_dir = self.ckpts.resolve(c.resume) if c.resume else None
        self.state = json.loads((self.resume_dir / STATE).read_text()) if self.resume_dir else {}

        model_cfg, image_tokenizer = resolve_model(c.model, load_weights=True)
        img = model_cfg.image
        max_length = model_cfg.backbone.max_position_embeddings
        self.sources = [build_source(s, seed=c.seed, channels=img.channels, resolution=img.resolution,
                                     max_chars=4 * max_length, verbose=self.main) for s in c.data.sources]
        self.tokenizer = self._text_tokenizer()
        if "vocab_size" not in c.model.backbone:
            model_cfg.backbone.vocab_size = len(self.tokenizer)
        elif model_cfg.backbone.vocab_size < len(self.tokenizer):
            raise ConfigError(f"model.backbone.vocab_size={model_cfg.backbone.vocab_size} is smaller than the text "
                              f"tokenizer ({len(self.tokenizer)} pieces); remove it to follow the tokenizer")
        if self.resume_dir:
            check_same_model(self.resume_dir, model_cfg.to_dict())

        set_seed(c.seed)  # python, numpy and torch global RNGs: the initialization, and anything else that draws
        self.model = MMGenModel(model_cfg, image_tokenizer)
        if self.resume_dir:
            load_weights(self.model, self.resume_dir / "model.safetensors")
        builder = SequenceBuilder(self.tokenizer, img.channels, img.resolution, img.tokens_per_image, max_length)
        self.mixture = Mixture([len(s) for s in self.sources], [s.weight for s in c.data.sources], c.seed,
                               c.data.epoch_size)
        self.dataset = TrainDataset(self.sources, self.mixture, builder, c.seed, c.data.max_skips, self.main)
        self.packer = Packer(self.tokenizer.pad_id, img.channels, img.resolution, c.data.packing,
                             c.data.pack_length or max_length)
        self.batches = StepBatches(len(self.dataset), c.train.batch_size, self.rank, self.world, c.train.grad_accum,
                                   0, c.train.steps)

        o = c.optim
        optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
        self.wrapped, self.optimizer = self.acc.prepare(LossModule(self.model), optimizer)
        self.names = {id(p): n for n, p in trainable(self.model).items()}
        self.ema = EMA(self.model, c.train.ema_decay) if c.train.ema_decay and self.main else None
        self.noise = torch.Generator(device=self.acc.device).manual_seed((c.seed + 1) * 1_000_003 + self.rank)
        self.step = 0
        self.counters = {"skipped_steps": 0, "skipped_items": 0, "truncated": 0, "samples_seen": 0,
                         "tokens_seen": 0, "nonfinite_in_a_row": 0}
        if self.resume_dir:
            self._load_state(self.resume_dir)

    # -- setup helpers ---------------------------------------------------------------------------

    def _text_tokenizer(self) -> TextTokenizer:
        """From the checkpoint being resumed, from tokenizer.path, or trained here on the data's text."""
        c = self.cfg.tokenizer
        if self.resume_dir and (self.resume_dir / TOKENIZER_FILE).is_file():
            return TextTokenizer.load(self.resume_dir)
        if c.path:
            p = Path(c.path)
            path = p / TOKENIZER_FILE if p.is_dir() else p
            if not path.is_file():
                raise ConfigError(f"tokenizer.path: {path} does not exist (train one with `mmgen train-text-tokenizer`)")
            try:
                return TextTokenizer(path.read_bytes())
            except (ValueError, RuntimeError) as e:
                raise ConfigError(f"tokenizer.path: {path}: {e}") from None
        target = self.out / TOKENIZER_FILE
        if self.main:
            texts = corpus(self.sources, c.max_texts)
            tok = TextTokenizer.train(texts, vocab_size=c.vocab_size, model_type=c.model_type)
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(tok.model_proto)
            os.replace(tmp, target)
        self.acc.wait_for_everyone()
        return TextTokenizer.load(self.out)

    def _load_state(self, d: Path) -> None:
        s = self.state
        if s["global_batch"] != self.cfg.train.batch_size:
            raise CheckpointError(f"{d} was trained with train.batch_size={s['global_batch']}, this run has "
                                  f"{self.cfg.train.batch_size}; the data position depends on it: keep it the same")
        if s["world_size"] != self.world and self.main:
            print(f"warning: {d} was written by {s['world_size']} process(es), resuming with {self.world}: the data "
                  "order is the same, the diffusion noise is not (not bit-identical to an uninterrupted run)")
        if s["step"] > self.cfg.train.steps:
            raise CheckpointError(f"{d} is at step {s['step']}, past train.steps={self.cfg.train.steps}")
        if (d / "optimizer.json").is_file() and not self.sharded:
            tensors, _ = read_tensors(d / "optimizer.safetensors")
            meta = json.loads((d / "optimizer.json").read_text())
            try:
                load_optimizer_state(self.optimizer, self.names, tensors, meta)
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{d}: cannot restore the optimizer: {e}") from None
        elif self.main:
            print(f"warning: {d} holds no optimizer state (an FSDP run) or this run is sharded: AdamW's moments "
                  "restart (not an exact resume)")
        if self.ema is not None:
            if (d / "ema.safetensors").is_file():
                shadow, meta = read_tensors(d / "ema.safetensors")
                for n, t in self.ema.shadow.items():
                    t.copy_(shadow[n])
                self.ema.updates = int(meta.get("updates", 0))
            else:
                print(f"warning: {d} has no EMA weights; the EMA starts from the current weights")
        rng_file = d / f"rng_{self.rank}.safetensors"
        if rng_file.is_file():
            restore_rng(*read_tensors(rng_file), self.noise)
        if self.acc.scaler is not None and "grad_scaler" in s:
            self.acc.scaler.load_state_dict(s["grad_scaler"])
        self.step = s["step"]
        self.counters = {k: s.get(k, 0) for k in self.counters}

    # -- the loop --------------------------------------------------------------------------------

    def forward_backward(self, micro: list[PackedBatch]) -> tuple[list[float], float, float]:
        """Gradients of the global-batch loss from this process's micro-batches (left in `.grad`).

        Returns the sums over all processes [lm_sum, ce_sum, z_sum, image_sum, samples, tokens, slots,
        skipped, truncated] and the global labelled-token and image counts (each at least 1).
        """
        acc, dev = self.acc, self.acc.device
        local = torch.tensor([sum(m.stats["labelled"] for m in micro), sum(m.stats["images"] for m in micro)],
                             dtype=torch.float64, device=dev)
        tokens, images = acc.reduce(local, reduction="sum").clamp(min=1).tolist()  # global counts
        self.wrapped.train()
        parts = torch.zeros(4, dtype=torch.float64, device=dev)  # lm_sum, ce_sum, z_sum, image_sum
        for i, mb in enumerate(micro):
            sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(self.wrapped)
            with sync:
                with acc.autocast():
                    out = self.wrapped(mb.batch.to(dev), self.noise)
                loss = (out["lm_sum"] / tokens + out["image_sum"] / images) * self.world
                acc.backward(loss)
            if int(out["tokens"]) != mb.stats["labelled"] or int(out["images"]) != mb.stats["images"]:
                raise TrainingError(f"the model counted {int(out['tokens'])} labelled tokens and {int(out['images'])} "
                                    f"images, the packer {mb.stats['labelled']} and {mb.stats['images']}")
            n = out["tokens"].double()
            parts += torch.stack([out["lm_sum"].detach().double(), out["lm"].double() * n, out["z"].double() * n,
                                  out["image_sum"].detach().double()])
        keys = ("samples", "tokens", "slots", "skipped", "truncated")
        counts = torch.tensor([sum(m.stats[k] for m in micro) for k in keys], dtype=torch.float64, device=dev)
        return acc.reduce(torch.cat([parts, counts]), reduction="sum").tolist(), tokens, images

    def train_step(self, micro: list[PackedBatch], step: int) -> dict[str, float]:
        """One optimizer step over this process's micro-batches; returns global (all-process) figures."""
        c, acc = self.cfg, self.acc
        lr = lr_at(step, c.optim.lr, c.optim.warmup_steps, c.train.steps, c.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        g, tokens, images = self.forward_backward(micro)
        total = g[0] / tokens + g[3] / images
        clip = c.optim.grad_clip if c.optim.grad_clip > 0 else float("inf")
        grad_norm = float(acc.clip_grad_norm_(self.wrapped.parameters(), clip))
        finite = torch.isfinite(torch.tensor([total, grad_norm])).all().item()
        if acc.scaler is not None:  # fp16: the grad scaler skips inf/NaN steps itself and lowers its scale
            self.optimizer.step()
            skipped = acc.optimizer_step_was_skipped
        else:
            skipped = not finite
            if finite:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not skipped and self.ema is not None:
            self.ema.update(self.model)
        k = self.counters
        if skipped and self.main:
            print(f"warning: step {step + 1}: non-finite loss ({total:.4g}) or gradient norm ({grad_norm:.4g}); "
                  f"update skipped ({k['skipped_steps'] + 1} so far)", file=sys.stderr, flush=True)
        k["skipped_steps"] += int(skipped)
        k["nonfinite_in_a_row"] = k["nonfinite_in_a_row"] + 1 if skipped else 0
        k["skipped_items"] += int(g[7])
        k["truncated"] += int(g[8])
        k["samples_seen"] += int(g[4])
        k["tokens_seen"] += int(g[5])
        if c.train.max_nonfinite and k["nonfinite_in_a_row"] >= c.train.max_nonfinite:
            raise TrainingError(f"{k['nonfinite_in_a_row']} steps in a row had a non-finite loss or gradient "
                                f"(step {step + 1}); lower optim.lr, set model.backbone.qk_norm=true or "
                                "model.diffusion.z_loss=1e-5, or use bf16 instead of fp16")
        return {"loss": total, "lm": g[1] / tokens, "z": g[2] / tokens, "image": g[3] / images,
                "grad_norm": grad_norm, "lr": lr, "skipped": float(skipped), "samples": g[4], "tokens": g[5],
                "slots": g[6]}

    def fit(self) -> Path:
        """Train from the current step to `train.steps`; checkpoint, log, sample; export; return OUT."""
        c, total, start = self.cfg, self.cfg.train.steps, self.step
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.yaml").write_text(yaml.safe_dump(to_dict(c), sort_keys=False))
            self._announce()
        tracker = Tracker(self.out, c.log, to_dict(c), start if self.resume_dir else None, self.main)
        self.batches.start = start
        loader = iter(make_loader(self.dataset, self.batches, self.packer, c.data.num_workers))
        bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, disable=not (self.main and c.log.progress))
        window: list[tuple[dict, float]] = []
        try:
            for step in range(start, total):
                t0 = time.perf_counter()
                micro = [next(loader) for _ in range(c.train.grad_accum)]
                window.append((self.train_step(micro, step), time.perf_counter() - t0))
                self.step = step + 1
                bar.update(1)
                if self.step % c.log.every == 0 or self.step == total:
                    row = self._row(window)
                    window = []
                    tracker.log(row)
                    if self.main:
                        bar.write(summary(row, total)) if not bar.disable else print(summary(row, total), flush=True)
                if c.samples.every and c.samples.prompts and (self.step % c.samples.every == 0 or self.step == total):
                    self.sample_grid()
                if (c.checkpoint.every and self.step % c.checkpoint.every == 0) or self.step == total:
                    self.save_checkpoint()
        finally:
            bar.close()
            tracker.close()
        if start >= total and self.main:
            print(f"{self.resume_dir} is already at step {total}: nothing to train; exporting")
        self.export()
        if c.eval.digits and self.main:
            self.evaluate()
        self.acc.wait_for_everyone()
        return self.out

    def _row(self, window: list[tuple[dict, float]]) -> dict:
        n = len(window)
        mean = {k: sum(r[k] for r, _ in window) / n for k in ("loss", "lm", "image", "z", "grad_norm")}
        tokens, slots, seconds = (sum(r["tokens"] for r, _ in window), sum(r["slots"] for r, _ in window),
                                  sum(t for _, t in window))
        return {"step": self.step, "epoch": self.batches.epoch_of(self.step - 1), **mean, "lr": window[-1][0]["lr"],
                "tokens_per_s": tokens / max(seconds, 1e-9), "padding": 1 - tokens / max(slots, 1),
                "samples": int(sum(r["samples"] for r, _ in window)), "tokens": int(tokens),
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

    # -- side outputs ----------------------------------------------------------------------------

    def sample_grid(self) -> None:
        """A PNG grid (one row per prompt) drawn with the EMA weights, on the main process."""
        if self.main:
            draw_grid(self.model, self.tokenizer, self.ema, self.cfg.samples,
                      self.out / "samples" / f"step_{self.step:08d}.png")

    def save_checkpoint(self) -> Path:
        """Every process writes its RNG states, the main one the rest; committed atomically at the end."""
        acc = self.acc
        if self.main:
            self.ckpts.begin(self.step)
        acc.wait_for_everyone()
        tmp = self.ckpts.tmp_dir(self.step)
        write_tensors(tmp / f"rng_{self.rank}.safetensors", *capture_rng(self.noise))
        self._save_weights(tmp / "model.safetensors")
        if self.main:
            if self.ema is not None:
                write_tensors(tmp / "ema.safetensors", self.ema.shadow, {"updates": str(self.ema.updates)})
            if not self.sharded:  # sharded (FSDP) optimizer state is not gathered: such a resume restarts the moments
                tensors, meta = optimizer_state(self.optimizer, self.names)
                write_tensors(tmp / "optimizer.safetensors", tensors)
                write_json(tmp / "optimizer.json", meta)
            write_json(tmp / "config.json", self.model.config.to_dict())
            write_json(tmp / "train_config.json", to_dict(self.cfg))
            (tmp / TOKENIZER_FILE).write_bytes(self.tokenizer.model_proto)
            state = {"step": self.step, "epoch": self.batches.epoch_of(self.step),
                     "position": self.step % self.batches.steps_per_epoch,
                     "steps_per_epoch": self.batches.steps_per_epoch, "global_batch": self.cfg.train.batch_size,
                     "world_size": self.world, "grad_accum": self.cfg.train.grad_accum, "seed": self.cfg.seed,
                     **self.counters}
            if acc.scaler is not None:
                state["grad_scaler"] = acc.scaler.state_dict()
            write_json(tmp / STATE, state)  # last: marks the directory complete
        acc.wait_for_everyone()
        final = self.ckpts.commit(self.step) if self.main else self.ckpts.root
        acc.wait_for_everyone()
        return final

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

    def export(self) -> None:
        """`save_pretrained` into OUT with the EMA weights (the raw ones stay in the last checkpoint)."""
        if self.sharded:  # the gathered weights, written like save_pretrained does (config.json last)
            self._save_weights(self.out / "model.safetensors.tmp")
            if self.main:
                os.replace(self.out / "model.safetensors.tmp", self.out / "model.safetensors")
                (self.out / TOKENIZER_FILE).write_bytes(self.tokenizer.model_proto)
                self.model.config.save(self.out / "config.json")
        elif self.main:
            if self.ema is not None:
                self.ema.copy_to(self.model)
            self.model.save_pretrained(self.out, self.tokenizer)
        self.acc.wait_for_everyone()

    def _save_weights(self, path: Path) -> None:
        """The whole model's weights to `path` (main process). Under FSDP every process must call this:
        the full state dict is gathered collectively."""
        if not self.sharded:
            if self.main:
                save_model(self.model, str(path), metadata={"format": "pt"})
                fsync_file(path)
            return
        state = self.acc.get_state_dict(self.wrapped)  # collective: gathered to the main process
        if self.main:
            state = {k.removeprefix("model."): v for k, v in state.items()}
            if self.model.config.backbone.tie_word_embeddings:
                state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight; load_model restores it
            write_tensors(path, state, {"format": "pt"})


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
