"""`mmgen serve` (and `python -m mmgen.serve`): the flags, the model load, uvicorn.

`add_serve_parser(subparsers)` adds the `serve` command to mmgen's parser; `cmd_serve(args)` runs
it. Every flag is a `ServeConfig` field with the same name (defaults come from the dataclass).
The model loads before the port opens, so a bad --model fails at once; SIGTERM / Ctrl-C stop
accepting and give open requests --shutdown-timeout seconds; rows still running then are cancelled
and their requests answered 503 (instead of a dropped connection), and the worker stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
from pathlib import Path

from mmgen.arguments import integer, seconds
from mmgen.serve.config import ServeConfig

FLAGS = [  # (field, type, help); the flag is --field-with-dashes
    ("model", Path, "model directory, or a bundled model: chat-tiny (the default), edit-tiny"),
    ("model_name", str, "the model id clients send (default: the directory name)"),
    ("device", str, "where the model runs: auto (CUDA when there is one), cpu, cuda or cuda:N"),
    ("dtype", str, "the weights' dtype: bf16 (GPUs that have it), fp16 or fp32"),
    ("host", str, "address to listen on (0.0.0.0 for every interface)"),
    ("port", integer(0), "port to listen on"),
    ("batch_window_ms", seconds, "how long to gather requests into a batch after the first arrives"),
    ("max_batch", integer(1), "rows per batch at most (1: one request at a time)"),
    ("max_queue", integer(1), "rows waiting for the model at most; more get 503"),
    ("max_concurrent", integer(1), "open generation requests at most; more get 503"),
    ("max_body_bytes", integer(1), "request body size limit in bytes (413 beyond)"),
    ("max_tokens", integer(1), "the largest max_tokens a request may ask for"),
    ("max_image_steps", integer(1), "the largest mmgen.steps a request may ask for"),
    ("max_n", integer(1), "choices (n) per request at most"),
    ("max_input_images", integer(0), "images in a request's messages at most"),
    ("max_image_pixels", integer(1), "pixels of one input image at most"),
    ("max_output_size", integer(1), "the largest images/generations size (an upscaled multiple of the model's)"),
    ("shutdown_timeout", seconds, "seconds open requests get to finish on SIGTERM"),
    ("log_level", str, "logging level: debug, info, warning, error"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServeConfig()
    for name, kind, text in FLAGS:
        default = getattr(defaults, name)
        shown = f" (default: {default})" if default is not None else ""
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=text + shown)
    parser.add_argument("--allow-local-files", action="store_true",
                        help="let image parts name files on the server's disk (off: base64 data URLs only)")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to an argparse subparsers object; the command runs `args.fn(args)` (= cmd_serve)."""
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (chat completions, images)",
                              description="Serve the model over HTTP: /v1/chat/completions, /v1/images/generations, "
                                          "/v1/models, /health. See docs/serve.md.")
    add_arguments(p)
    p.set_defaults(fn=cmd_serve)
    return p


def config_from(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})


def cmd_serve(args: argparse.Namespace) -> None:
    """Load the model and serve until SIGTERM / Ctrl-C."""
    import uvicorn

    from mmgen.serve.app import create_app
    from mmgen.serve.service import Service

    config = config_from(args)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = Service.load(config)
    uv_config = uvicorn.Config(create_app(service), host=config.host, port=config.port, log_level=config.log_level,
                               access_log=False, timeout_graceful_shutdown=config.shutdown_timeout)
    _server(uv_config, service.batcher.close, config.shutdown_timeout).run()


def _server(config, close, timeout: float):
    """uvicorn's Server, plus: on SIGTERM / Ctrl-C, `close` runs just before the drain time is up, so the
    requests still open get an answer (503) before uvicorn would cancel them."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                timer = threading.Timer(max(0.0, timeout - 0.5), close)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    return Server(config)
