"""`mmgen serve` end to end: a real uvicorn server on loopback, talked to with the official `openai` client
(and raw HTTP where a client would refuse to send the bad request)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import torch
import uvicorn
from conftest import ScriptedFeed
from PIL import Image

from mmgen.data.digits import DigitsDataset, parse_digit
from mmgen.data.images import load_image
from mmgen.evaluation import DigitClassifier
from mmgen.events import Done, RowDone
from mmgen.generation import Engine, GenerationOptions, Join
from mmgen.pipeline import to_pil
from mmgen.serve.app import create_app
from mmgen.serve.config import ServeConfig
from mmgen.serve.service import Service

FAST = {"mmgen": {"steps": 6}}  # few denoising steps keep the file quick


@pytest.fixture(scope="module")
def server():
    service = Service.load(ServeConfig(port=0, batch_window_ms=40, max_body_bytes=100_000, max_tokens=64))
    uv = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = uv.servers[0].sockets[0].getsockname()[1]
    yield SimpleNamespace(service=service, port=port,
                          client=openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0))
    uv.should_exit = True
    thread.join(15)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def classifier(server) -> DigitClassifier:
    return DigitClassifier(3, server.service.image_size)


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def png(url_or_b64: str) -> Image.Image:
    data = url_or_b64.split(",", 1)[1] if url_or_b64.startswith("data:") else url_or_b64
    return Image.open(io.BytesIO(base64.b64decode(data)))


def digit_of(image: Image.Image, classifier: DigitClassifier) -> int:
    return int(classifier.predict(load_image(image, 3, image.width)[None])[0])


def raw_post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    out = response.status, json.loads(response.read())
    conn.close()
    return out


def test_models_and_a_text_reply(server):
    assert [m.id for m in server.client.models.list().data] == ["chat-tiny"]
    reply = server.client.chat.completions.create(model="chat-tiny", messages=user("hello! what can you do?"))
    choice = reply.choices[0]
    assert isinstance(choice.message.content, str) and "digits" in choice.message.content
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    u = reply.usage
    assert u.prompt_tokens > 5 and u.completion_tokens > 5 and u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_stop_strings_and_max_tokens_end_a_reply_early(server):
    ask = {"model": "chat-tiny", "messages": user("draw a handwritten digit 7"), "extra_body": {"mmgen": {"image": "never"}}}
    stopped = server.client.chat.completions.create(stop=["digit"], **ask).choices[0]
    assert stopped.message.content == "here is a handwritten " and stopped.finish_reason == "stop"
    short = server.client.chat.completions.create(max_tokens=3, **ask)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_streamed_reply_equals_the_plain_one(server):
    ask = {"model": "chat-tiny", "messages": user("draw a handwritten digit 7"), "temperature": 0.8, "seed": 5,
           "extra_body": FAST}
    plain = server.client.chat.completions.create(**ask).choices[0].message.content
    assert [p["type"] for p in plain] == ["text", "image_url"]  # a reply with an image is a list of parts
    text, image_urls, finish, usage = "", [], None, None
    for chunk in server.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **ask):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if isinstance(c.delta.content, str):
                text += c.delta.content
            elif c.delta.content:
                image_urls += [p["image_url"]["url"] for p in c.delta.content]
            finish = c.finish_reason or finish
    assert text == plain[0]["text"] and image_urls == [plain[1]["image_url"]["url"]]
    assert finish == "stop" and usage.completion_tokens > 18  # text + the image's 18 positions


def test_an_image_in_gets_a_caption(server):
    test = DigitsDataset("test")
    right = 0
    for i in range(3):
        out = io.BytesIO()
        to_pil(test.images[i]).save(out, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "which digit is this?"}]
        reply = server.client.chat.completions.create(model="chat-tiny", messages=user(content)).choices[0]
        right += parse_digit(reply.message.content) == int(test.labels[i])
    assert right >= 2


def test_images_out_are_the_digit_asked_for(server, classifier):
    reply = server.client.chat.completions.create(model="chat-tiny", messages=user("draw a handwritten digit 7"), n=3,
                                                  seed=0, extra_body={"mmgen": {"steps": 8, "image": "always"}})
    drawn = [png(c.message.content[-1]["image_url"]["url"]) for c in reply.choices]
    assert sum(digit_of(im, classifier) == 7 for im in drawn) >= 2
    result = server.client.images.generate(model="chat-tiny", prompt="a handwritten digit 3", n=3, size="32x32",
                                           response_format="b64_json", extra_body={"seed": 1, **FAST})
    images = [png(d.b64_json) for d in result.data]
    assert all(im.size == (32, 32) for im in images)  # 2× nearest-neighbour upscaling of the model's 16×16
    assert sum(digit_of(im, classifier) == 3 for im in images) >= 2


def test_a_request_gives_the_same_answer_alone_and_batched(server):
    prompts = ["draw a handwritten digit 4", "hello! what can you do?", "draw a red circle", "a handwritten digit 9"]

    def ask(i: int):
        reply = server.client.chat.completions.create(model="chat-tiny", messages=user(prompts[i]), seed=10 + i,
                                                      temperature=0.7, extra_body=FAST)
        return reply.choices[0].message.content

    alone = [ask(0), ask(3)]
    before = server.service.batcher.stats()
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, range(4)))
    after = server.service.batcher.stats()
    assert after.batches - before.batches < after.rows - before.rows, "the requests were not batched"
    for a, b in zip(alone, [together[0], together[3]]):
        assert type(a) is type(b)
        if isinstance(a, str):
            assert a == b
        else:
            assert a[0] == b[0]
            x, y = (np.asarray(png(p["image_url"]["url"]), dtype=int) for p in (a[1], b[1]))
            assert np.abs(x - y).max() <= 1  # float rounding of a batched matmul may move a pixel by one level


@pytest.mark.parametrize("body, status, words", [
    ({"model": "gpt-4", "messages": user("hi")}, 404, "gpt-4"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0]"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "system", "content": "be nice"}, *user("hi")]}, 400, "system"),
    ({"messages": user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}])}, 400, "base64"),
    ({"messages": user([{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}])}, 400, "data URL"),
    ({"messages": user([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}])}, 400, "allow-local-files"),
    ({"messages": user("hi"), "max_tokens": -5}, 400, "max_tokens"),
    ({"messages": user("hi"), "max_tokens": 10_000}, 400, "max_tokens"),
    ({"messages": user("hi"), "temperature": "hot"}, 400, "temperature"),
    ({"messages": user("hi"), "n": 0}, 400, "n"),
    ({"messages": user("hi"), "mmgen": {"steps": 0}}, 400, "mmgen.steps"),
    ({"messages": user("hi"), "mmgen": {"sampler": "nope"}}, 400, "nope"),
    ({"messages": user("hi"), "mmgen": {"colour": 1}}, 400, "colour"),
    ({"messages": user("hi"), "tools": [{"type": "function"}]}, 400, "tools"),
])
def test_bad_chat_requests_are_named_and_the_server_keeps_serving(server, body, status, words):
    code, answer = raw_post(server.port, "/v1/chat/completions", json.dumps(body).encode())
    assert code == status and words in answer["error"]["message"], answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}


def test_bad_requests_through_the_client_and_raw_http(server):
    c = server.client
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=user("hi"))
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="16x16"):
        c.images.generate(model="chat-tiny", prompt="a handwritten digit 3", size="20x20")
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        c.images.generate(model="chat-tiny", prompt="a handwritten digit 3", response_format="url")
    checks = [(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature = nan"),
              (b'{"messages": [', 400, "not valid JSON"),
              (b'{"messages": "' + b"x" * 150_000 + b'"}', 413, "--max-body-bytes")]
    for body, status, words in checks:
        code, answer = raw_post(server.port, "/v1/chat/completions", body)
        assert code == status and words in answer["error"]["message"], answer
    reply = c.chat.completions.create(model="chat-tiny", messages=user("hello! what can you do?"))
    assert "digits" in reply.choices[0].message.content  # still serving


def test_rows_join_a_running_batch_and_a_disconnect_frees_its_row(server, monkeypatch):
    model, batcher = server.service.chat.model, server.service.batcher
    slow = model.logits

    def logits(hidden):  # ~0.15 s per decode step: the streamed reply below takes seconds
        time.sleep(0.15)
        return slow(hidden)

    monkeypatch.setattr(model, "logits", logits)
    before = batcher.stats()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": user("hello! what can you do?"),
                                                             "stream": True}), {"Content-Type": "application/json"})
    stream = conn.getresponse()
    assert stream.status == 200
    while b'"delta": {"content": "' not in stream.readline():  # skip the role chunk: wait for a token
        pass
    short = server.client.chat.completions.create(model="chat-tiny", messages=user("hi"), max_tokens=2)
    assert short.choices[0].finish_reason == "length"
    assert batcher.stats().joined > before.joined and batcher.stats().running == 1  # it joined; the stream runs on
    conn.close()  # the client leaves mid-stream
    deadline = time.monotonic() + 2
    while batcher.stats().running and time.monotonic() < deadline:
        time.sleep(0.05)
    after = batcher.stats()
    assert after.running == 0 and after.cancelled == before.cancelled + 1


def test_engine_rows_join_and_leave_without_changing_the_others(model, builder, tokenizer):
    """The engine hook under the batcher: per-row token limits, a row joining a running call, a row
    cancelled mid-way; every row's output is what it would be alone."""
    engine = Engine(model, builder)
    opts = GenerationOptions(max_new_tokens=10, image_steps=2)
    prompts = [[tokenizer.encode("a handwritten digit 7")], [tokenizer.encode("digit 2")], [tokenizer.encode("seven")]]

    def alone(i: int, seed: int, force: bool, limit: int) -> list:
        return engine.generate([prompts[i]], opts, seed=[seed], force_image=[force], max_new_tokens=[limit])[0]

    events = list(engine.stream(prompts[:2], opts, seed=[7, 8], force_image=[True, False], max_new_tokens=[10, 10],
                                feed=ScriptedFeed(Join(prompts[2], seed=9, max_new_tokens=4))))
    assert isinstance(events[-1], Done)
    ends = {e.row: e.reason for e in events if isinstance(e, RowDone)}
    out = events[-1].outputs
    assert ends[1] == "cancelled" and set(ends) == {0, 1, 2}
    for got, want in [(out[0], alone(0, 7, True, 10)), (out[2], alone(2, 9, False, 4))]:
        assert len(got) == len(want)
        for x, y in zip(got, want):
            if isinstance(x, list):
                assert x == y
            else:
                torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    full = alone(1, 8, False, 10)
    assert sum(map(len, out[1])) < sum(map(len, full)) and out[1][0] == full[0][:len(out[1][0])]
