"""The settings of `mmgen serve`, one field per command-line flag (`mmgen.serve.cli` builds it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServeConfig:
    """Server settings and limits.

    Batching: the worker gathers requests for `batch_window_ms` after the first one arrives and runs
    up to `max_batch` rows at once; more rows join a running batch between decode steps. Limits:
    `max_queue` rows waiting for the model and `max_concurrent` open generation requests (beyond
    either: 503), `max_body_bytes` per request body (413), `max_tokens` per reply, `max_image_steps` per image, `max_n` choices,
    `max_input_images` images per request and `max_image_pixels` per image (400).
    """

    model: Path | None = None  # a model directory or a bundled model's name; None: chat-tiny
    model_name: str | None = None  # the id clients send as `model`; None: the directory name
    device: str = "auto"  # where the model runs: auto (CUDA when there is one), cpu, cuda, cuda:N
    dtype: str = "fp32"  # the weights' dtype: bf16, fp16 or fp32 (`mmgen.files.DTYPES`)
    host: str = "127.0.0.1"
    port: int = 8000
    batch_window_ms: float = 10.0
    max_batch: int = 32
    max_queue: int = 256
    max_concurrent: int = 512
    max_body_bytes: int = 4 * 2**20
    max_tokens: int = 256
    max_image_steps: int = 100
    max_n: int = 8
    max_input_images: int = 8
    max_image_pixels: int = 2048 * 2048
    max_output_size: int = 1024  # the largest images/generations `size` (the model's size × an integer)
    allow_local_files: bool = False  # image parts may name files on the server's disk
    shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish on SIGTERM
    log_level: str = "info"
