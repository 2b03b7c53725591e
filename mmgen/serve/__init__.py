"""`mmgen serve`: an OpenAI-compatible HTTP server for a unified model, with dynamic batching.

    config.py      ServeConfig: every flag of `mmgen serve`
    protocol.py    OpenAI request validation and response bodies; APIError
    images.py      image parts: data URLs in, PNG data URLs / base64 out
    reply.py       one choice's answer from engine events: text deltas, stop strings, images, counts
    batcher.py     the worker thread that owns the engine and batches rows (continuous batching)
    service.py     requests -> engine jobs (chat template, options, prompt length)
    app.py         Starlette routes, OpenAI error bodies, server-sent events, request logs
    cli.py         `mmgen serve` / `python -m mmgen.serve`: the argument parser and uvicorn

See docs/serve.md.
"""
