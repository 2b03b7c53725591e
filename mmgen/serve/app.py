"""The HTTP side: Starlette routes, OpenAI error bodies, server-sent events, one log line per request.

Stack: Starlette (routing, requests, responses) under uvicorn. We validate bodies ourselves
(`mmgen.serve.protocol`) because every error must be OpenAI's error JSON naming the field, so a
pydantic layer (FastAPI) would add a second schema and its own 422 format, and nothing we need.
Handlers never run torch: jobs are prepared in a thread, the `Batcher`'s worker runs the model and
hands events back with `loop.call_soon_threadsafe`. A client that disconnects (watched on the ASGI
receive channel, streaming or not) has its rows cancelled at the next decode step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mmgen.serve import images, protocol
from mmgen.serve.batcher import Failed, Overloaded
from mmgen.serve.protocol import APIError
from mmgen.serve.reply import Reply
from mmgen.serve.service import Service, Work, loop_deliver

log = logging.getLogger("mmgen.serve")
DONE = object()  # marks a choice's end in `_outputs`


class ClientGone(Exception):
    """The client disconnected before the answer was complete."""


def create_app(service: Service) -> Starlette:
    """The ASGI app for a loaded `Service`; the batcher starts and stops with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: Starlette):
        service.batcher.start()
        log.info("serving %s on the %s device; batches of up to %d rows", service.model_id,
                 service.chat.model.device, service.config.max_batch)
        yield
        service.batcher.close(service.config.shutdown_timeout)

    routes = [Route("/health", health), Route("/v1/models", list_models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/images/generations", images_generations, methods=["POST"])]
    handlers = {APIError: _api_error, HTTPException: _http_error, ClientGone: _client_gone, Exception: _server_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.service, app.state.started = service, int(time.time())
    app.add_middleware(Limit, limit=service.config.max_concurrent)
    app.add_middleware(RequestLog)  # outermost: refusals are logged too
    return app


# -- routes -----------------------------------------------------------------------------------------

async def health(request: Request) -> Response:
    s = request.app.state.service.batcher.stats()
    return JSONResponse({"status": "ok", "model": request.app.state.service.model_id, "running": s.running,
                         "waiting": s.waiting, "batches": s.batches, "rows": s.rows, "joined": s.joined,
                         "cancelled": s.cancelled, "max_rows": s.max_rows})


async def list_models(request: Request) -> Response:
    return JSONResponse(protocol.models(request.app.state.service.model_id, request.app.state.started))


async def chat_completions(request: Request) -> Response:
    service: Service = request.app.state.service
    rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    request.state.log = {"id": rid}
    body = await _read_json(request, service.config.max_body_bytes)
    req = protocol.parse_chat(body, service.config, service.model_id, service.image_size)
    request.state.log.update(stream=req.stream, n=req.n)
    queue: asyncio.Queue = asyncio.Queue()
    work = await run_in_threadpool(service.chat_work, req, loop_deliver(asyncio.get_running_loop(), queue))
    replies = [Reply(service.tokenizer, req.stop, service.image_tokens) for _ in work.jobs]
    _submit(service, work)
    outputs = _outputs(service, queue, work, replies)
    if req.stream:
        events = _chat_events(rid, created, service.model_id, req, outputs, replies, work)
        return EventStream(events, lambda: service.batcher.cancel(work.jobs), request.state.log, replies, work)
    await _until_done(_drain(outputs), request, service, work)
    _account(request.state.log, replies, work)
    choices = [(_content(r.content(), req.scale), r.finish_reason) for r in replies]
    return JSONResponse(protocol.completion(rid, created, service.model_id, choices, _usage(replies, work)))


async def images_generations(request: Request) -> Response:
    service: Service = request.app.state.service
    request.state.log = {"id": "img-" + secrets.token_hex(8)}
    body = await _read_json(request, service.config.max_body_bytes)
    req = protocol.parse_images(body, service.config, service.model_id, service.image_size)
    request.state.log["n"] = req.n
    queue: asyncio.Queue = asyncio.Queue()
    work = await run_in_threadpool(service.images_work, req, loop_deliver(asyncio.get_running_loop(), queue))
    replies = [Reply(service.tokenizer, (), service.image_tokens) for _ in work.jobs]
    _submit(service, work)
    await _until_done(_drain(_outputs(service, queue, work, replies)), request, service, work)
    _account(request.state.log, replies, work)
    pictures = [p for r in replies for p in r.parts if not isinstance(p, str)]
    if len(pictures) != len(replies):
        raise APIError(500, "the model did not finish an image (it ran out of context); shorten the prompt")
    return JSONResponse(protocol.images(int(time.time()), [images.png_base64(p, req.scale) for p in pictures]))


# -- request plumbing -------------------------------------------------------------------------------

async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past `limit` bytes (by Content-Length, or while reading), 400 if not JSON."""
    too_big = APIError(413, f"the request body is over the server's limit of {limit} bytes (--max-body-bytes); "
                            "send smaller images", None, "request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise too_big
    try:
        return json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise APIError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None


def _submit(service: Service, work: Work) -> None:
    try:
        service.batcher.submit(work.jobs)
    except Overloaded as e:
        raise APIError(503, str(e), None, "server_overloaded") from None


async def _outputs(service: Service, queue: asyncio.Queue, work: Work, replies: list[Reply]
                   ) -> AsyncIterator[tuple[int, Any]]:
    """(choice, text delta | PIL image | DONE) as the rows produce them, until every choice is done.
    A choice that hits a stop string is done at once and its row cancelled."""
    left = len(replies)
    while left:
        choice, event = await queue.get()
        reply = replies[choice]
        if reply.done:
            continue
        if isinstance(event, Failed):
            raise APIError(event.status, event.message, None, "server_error")
        for out in reply.feed(event):
            yield choice, out
        if reply.done:
            left -= 1
            if reply.stopped:
                service.batcher.cancel([work.jobs[choice]])
            yield choice, DONE


async def _drain(outputs: AsyncIterator) -> None:
    async for _ in outputs:
        pass


async def _until_done(work_done: Awaitable, request: Request, service: Service, work: Work) -> None:
    """Await `work_done`, unless the client leaves first: then cancel the rows and raise ClientGone."""
    task, gone = asyncio.ensure_future(work_done), asyncio.ensure_future(_disconnect(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            service.batcher.cancel(work.jobs)
    if not task.done() or task.cancelled():
        raise ClientGone()
    task.result()  # re-raises an APIError from the rows


async def _disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _content(content: str | list, scale: int) -> str | list[dict]:
    """A reply's content in OpenAI form: a string, or text and image_url parts (PNG data URLs)."""
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": p} if isinstance(p, str)
            else {"type": "image_url", "image_url": {"url": images.png_data_url(p, scale)}} for p in content]


def _usage(replies: list[Reply], work: Work) -> dict:
    return protocol.usage(work.prompt_tokens * len(replies), sum(r.completion_tokens for r in replies))


def _account(entry: dict, replies: list[Reply], work: Work) -> None:
    """Add the request's counts to its log line."""
    entry.update(prompt_tokens=work.prompt_tokens * len(replies),
                 completion_tokens=sum(r.completion_tokens for r in replies),
                 images=sum(not isinstance(p, str) for r in replies for p in r.parts),
                 finish=",".join(str(r.finish_reason) for r in replies))


# -- streaming --------------------------------------------------------------------------------------

def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _chat_events(rid: str, created: int, model: str, req: protocol.ChatRequest, outputs: AsyncIterator,
                       replies: list[Reply], work: Work) -> AsyncIterator[str]:
    """The SSE lines of a streamed chat completion: per choice a role delta, content deltas (text, or a
    list with one image part), a finish chunk; then the usage chunk if asked; then [DONE]."""
    for i in range(len(replies)):
        yield _sse(protocol.chunk(rid, created, model, i, {"role": "assistant", "content": ""}))
    try:
        async for i, out in outputs:
            if out is DONE:
                yield _sse(protocol.chunk(rid, created, model, i, {}, replies[i].finish_reason))
            else:
                content = out if isinstance(out, str) else _content([out], req.scale)
                yield _sse(protocol.chunk(rid, created, model, i, {"content": content}))
        if req.include_usage:
            yield _sse(protocol.chunk(rid, created, model, None, use=_usage(replies, work)))
    except APIError as e:  # the status line is gone: the error travels as an event
        yield _sse(e.body())
    yield _sse("[DONE]")


class EventStream(Response):
    """A `text/event-stream` response that watches for the client leaving while it streams (not only at
    the next write), and then cancels the request's rows (`on_close`)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close, entry: dict, replies: list[Reply], work: Work):
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # no Content-Length: a stream
        self.events, self.on_close, self.entry, self.replies, self.work = events, on_close, entry, replies, work

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        pump, gone = asyncio.ensure_future(self._pump(send)), asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left = gone.done() and not gone.cancelled()
            for task in (pump, gone):
                task.cancel()
            await asyncio.gather(pump, gone, return_exceptions=True)
            await self.events.aclose()
            self.on_close()  # rows still running (client gone, or shutting down) are cancelled
            _account(self.entry, self.replies, self.work)
            self.entry["disconnected"] = left
        error = None if pump.cancelled() else pump.exception()
        if error is None and not left:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif error is not None and not isinstance(error, OSError):  # OSError: the client is gone
            raise error

    async def _pump(self, send) -> None:
        async for line in self.events:
            await send({"type": "http.response.body", "body": line.encode(), "more_body": True})


# -- errors and logs --------------------------------------------------------------------------------

async def _api_error(request: Request, exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code)


async def _client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it; logged as 499, as nginx does


async def _server_error(request: Request, exc: Exception) -> Response:
    """A bug: answered 500 in OpenAI's format (Starlette then re-raises it, so uvicorn logs the traceback)."""
    return JSONResponse(APIError(500, f"internal error ({type(exc).__name__}); see the server log").body(),
                        status_code=500)


class Limit:
    """ASGI middleware: at most `limit` generation requests (POST) open at once, streams included, so
    a flood is refused with 503 before it costs memory or threads."""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.open = app, limit, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.open >= self.limit:
            busy = APIError(503, f"the server is busy: {self.limit} requests are open (--max-concurrent); retry later",
                            None, "server_overloaded")
            return await JSONResponse(busy.body(), status_code=503)(scope, receive, send)
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1


class RequestLog:
    """ASGI middleware: one log line per request when its response ends (streams included): id, route,
    status, latency and what the handler recorded (tokens, images, finish reasons)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def record(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            entry = scope.get("state", {}).get("log", {})
            fields = " ".join(f"{k}={v}" for k, v in entry.items() if k != "id")
            log.info("%s %s %s status=%d latency_ms=%.1f %s", entry.get("id", "-"), scope["method"], scope["path"],
                     status[0] or 500, 1000 * (time.perf_counter() - start), fields)
