"""Training logs: a CSV file always, tensorboard when installed, wandb when asked; the summary line.

Only the main process logs; `read_log` reads the CSV back. On resume the CSV keeps its rows up to
the resumed step and drops the rest (they belong to the interrupted run past its last checkpoint).
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any

COLUMNS = ["step", "epoch", "loss", "lm", "image", "z", "grad_norm", "lr", "tokens_per_s", "padding",
           "samples", "tokens", "skipped_steps", "skipped_items", "truncated", "seconds"]


class Tracker:
    """Args:
        out: run directory (train_log.csv, tensorboard/).
        config: the `LogConfig`.
        run_config: the whole config as a dict (for wandb).
        resume_step: the step a resumed run starts from (None: a new run).
        enabled: False on every process but the main one.
    """

    def __init__(self, out: Path, config, run_config: dict, resume_step: int | None, enabled: bool):
        self.enabled, self.tb, self.wandb = enabled, None, None
        self.path = Path(out) / "train_log.csv"
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.path.is_file():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        if config.tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
        if config.wandb:
            try:
                import wandb
            except ImportError:
                raise ValueError("log.wandb is on but wandb is not installed: pip install wandb, or set "
                                 "--log.wandb=false") from None
            self.wandb = wandb.init(project=config.wandb_project, config=run_config, dir=str(out),
                                    resume="allow" if resume_step is not None else None)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_log(out: str | Path) -> list[dict[str, float]]:
    """The rows of OUT/train_log.csv, every value a number (one row per logged window)."""
    with (Path(out) / "train_log.csv").open(newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def summary(row: dict[str, Any], total: int) -> str:
    """One line: step, loss parts, gradient norm, learning rate, throughput, padding, skips."""
    return (f"step {row['step']}/{total} ep {row['epoch']} | loss {row['loss']:.4f} (lm {row['lm']:.4f} "
            f"image {row['image']:.4f} z {row['z']:.1f}) | gnorm {row['grad_norm']:.3f} | lr {row['lr']:.2e} | "
            f"{row['tokens_per_s']:,.0f} tok/s | pad {100 * row['padding']:.1f}% | skipped steps "
            f"{row['skipped_steps']}, items {row['skipped_items']}")
