"""Measure a chat model (default: the bundled one) on what issue 6 asks, and draw the README's pictures.

    python benchmarks/chat_model.py                      # the bundled model, default settings
    python benchmarks/chat_model.py --model runs/chat-tiny --per-class 20 --docs docs/chat

Digits: `--per-class` images per digit from "a handwritten digit d" (the `mmgen generate` path) and
from the chat request "draw a handwritten digit d", judged by an SVM trained on real digits taken
to the model's image format and back (`mmgen.evaluation.DigitClassifier`); captions of the 297
held-out real digits, from tensors (`Pipeline.caption`), from 8×8 PNG files (the `mmgen caption`
path) and through the chat ("which digit is this?"), counted right when they name the digit.
Shapes: for each of the 6 colors × 3 shapes, `--per-class` images from the chat request "draw a
red circle" and from the caption prompt "a red circle in the center"; the color is the palette
color nearest the mean of the bright pixels (`mmgen.data.shapes.classify_color`), the shape comes
from `mmgen.shape_judge.ShapeJudge` (an SVM on the brightness mask trained on 3,000 real
single-object shapes; its accuracy on 600 held-out real shapes is printed beside); and the chat's
answer to "what is this?" for held-out real shapes, right when it names both the color and the shape.
Time to the first image: a fresh `python -c` that imports mmgen, loads the model and draws one image,
timed from outside.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmgen.chat import Chat
from mmgen.data.digits import DigitsDataset, parse_digit
from mmgen.data.images import load_image
from mmgen.data.shapes import COLORS, SHAPES, ShapesDataset, classify_color
from mmgen.evaluation import DigitClassifier
from mmgen.files import save_image_grid
from mmgen.generation import GenerationOptions
from mmgen.pipeline import to_pil
from mmgen.shape_judge import ShapeJudge


def image_of(parts: list) -> torch.Tensor | None:
    for p in parts:
        if not isinstance(p, str):
            return load_image(p, 3, p.width)
    return None


def article(col: str) -> str:
    return "an" if col[0] in "aeiou" else "a"


def measure_digits(chat: Chat, n: int, opts: GenerationOptions) -> tuple[dict, torch.Tensor]:
    """Prompted-class accuracy of drawn digits (generate and chat paths) and the three caption paths."""
    pipe, c, fig = chat.pipe, chat.model.config.image, {}
    clf = DigitClassifier(c.channels, c.resolution)
    t0 = time.perf_counter()
    drawn = torch.stack(pipe.draw([f"a handwritten digit {d}" for d in range(10) for _ in range(n)], opts, seed=0))
    fig["digits: generate 'a handwritten digit d'"] = float((clf.predict(drawn) == np.repeat(np.arange(10), n)).mean())
    fig["seconds to draw the digits"] = round(time.perf_counter() - t0, 1)
    replies = chat.batch([[{"role": "user", "content": f"draw a handwritten digit {d}"}] for d in range(10)
                          for _ in range(n)], seed=0)
    imgs = [image_of(r) for r in replies]
    ok = [im is not None and clf.predict(im[None])[0] == d for im, d in zip(imgs, np.repeat(np.arange(10), n))]
    fig["digits: chat 'draw a handwritten digit d' (image in the answer and right)"] = float(np.mean(ok))

    test = DigitsDataset("test")
    labels = test.labels.tolist()
    caps = pipe.caption(list(test.images))
    fig["digits: captions of 297 held-out digits (tensors)"] = float(np.mean([parse_digit(t) == y for t, y in
                                                                              zip(caps, labels)]))
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, x in enumerate(test.images):
            paths.append(Path(tmp) / f"{i}.png")
            to_pil(x).save(paths[-1])  # 8×8 grey PNGs, as a user would have them
        caps_png = pipe.caption(paths)
    fig["digits: captions of 297 held-out digits (8×8 PNG files)"] = float(np.mean([parse_digit(t) == y for t, y in
                                                                                   zip(caps_png, labels)]))
    answers = chat.batch([[{"role": "user", "content": [x, "which digit is this?"]}] for x in test.images])
    fig["digits: chat 'which digit is this?' on 297 held-out digits"] = float(np.mean(
        [parse_digit(" ".join(p for p in a if isinstance(p, str))) == y for a, y in zip(answers, labels)]))
    return fig, drawn


def measure_shapes(chat: Chat, n: int, opts: GenerationOptions) -> tuple[dict, list[torch.Tensor | None]]:
    """Color / shape / both of drawn shapes (chat and generate paths) and the chat's answer on real shapes."""
    pipe, c = chat.pipe, chat.model.config.image
    shape_judge = ShapeJudge(c.resolution)
    fig = {"shapes: shape classifier on 600 held-out real shapes": shape_judge.holdout_accuracy}
    combos = [(col, shp) for col in COLORS for shp in SHAPES]

    def judge(images: list[torch.Tensor | None]) -> list[float]:
        want = [combo for combo in combos for _ in range(n)]
        col = [im is not None and classify_color(((im.permute(1, 2, 0) + 1) * 127.5).numpy()) == w[0]
               for im, w in zip(images, want)]
        shp = [im is not None and shape_judge.shape([im])[0] == w[1] for im, w in zip(images, want, strict=True)]
        return [float(np.mean(col)), float(np.mean(shp)), float(np.mean(np.array(col) & np.array(shp)))]

    replies = chat.batch([[{"role": "user", "content": f"draw {article(col)} {col} {shp}"}] for col, shp in combos
                          for _ in range(n)], seed=0)
    shapes_chat = [image_of(r) for r in replies]
    fig["shapes: chat 'draw a red circle': color / shape / both"] = judge(shapes_chat)
    shapes_gen = list(pipe.draw([f"{article(col)} {col} {shp} in the center" for col, shp in combos for _ in range(n)],
                                opts, seed=0))
    fig["shapes: generate 'a red circle in the center': color / shape / both"] = judge(shapes_gen)
    held = ShapesDataset(size=200, resolution=c.resolution, max_objects=1, seed=12345)
    answers = chat.batch([[{"role": "user", "content": [held[i][0], "what is this?"]}] for i in range(len(held))])
    right = []
    for i, a in enumerate(answers):
        o, text = held.objects(i)[0], " ".join(p for p in a if isinstance(p, str))
        right.append(o.color in text and o.shape in text)
    fig["shapes: chat 'what is this?' on 200 held-out shapes (color and shape named)"] = float(np.mean(right))
    return fig, shapes_chat


def converse(chat: Chat) -> list[tuple[str, list]]:
    """A three-turn conversation: (user message, reply) per turn."""
    messages = [{"role": "user", "content": "hello! what can you do?"}]
    transcript = []
    for ask in (None, "draw a handwritten digit 7", "what did you draw?"):
        if ask is not None:
            messages.append({"role": "user", "content": ask})
        reply = chat(messages)
        messages.append({"role": "assistant", "content": reply})
        transcript.append((messages[-2]["content"], reply))
    return transcript


def seconds_to_first_image(model: str | None) -> float:
    """Wall time of a fresh `python -c` that imports mmgen, loads the model and draws one image."""
    code = ("from mmgen.chat import Chat; c = Chat.from_pretrained(" + (repr(model) if model else "") + "); "
            "r = c([{'role': 'user', 'content': 'draw a handwritten digit 7'}]); "
            "assert any(not isinstance(p, str) for p in r)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return round(time.perf_counter() - t0, 2)


def report(title: str, fig: dict, transcript: list[tuple[str, list]]) -> None:
    print(f"\n{title}\n")
    print("| what | figure |\n|---|---|")
    for k, v in fig.items():
        shown = " / ".join(f"{100 * x:.1f}%" for x in v) if isinstance(v, list) else (
            f"{v:.2f}" if "seconds" in k else f"{100 * v:.1f}%")
        print(f"| {k} | {shown} |")
    print("\nconversation:")
    for ask, reply in transcript:
        print(f"  user: {ask}\n  assistant: {[p if isinstance(p, str) else f'<image {p.size}>' for p in reply]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--docs", default=None, help="write the README's digits and shapes grids here")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    chat = Chat.from_pretrained(args.model)
    n, res = args.per_class, chat.model.config.image.resolution
    opts = GenerationOptions()  # the defaults of `mmgen generate`: 25 Euler steps, guidance 3
    digits, drawn = measure_digits(chat, n, opts)
    shapes, shapes_chat = measure_shapes(chat, n, opts)
    transcript = converse(chat)
    fig = {**digits, **shapes, "seconds from a fresh `python -c` to the first image": seconds_to_first_image(args.model)}
    report(f"{args.model or 'bundled model'}: {n} per class", fig, transcript)
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
    if args.docs:
        out = Path(args.docs)
        out.mkdir(parents=True, exist_ok=True)
        save_image_grid(drawn.view(10, n, *drawn.shape[1:])[:, :8], out / "digits.png", scale=4, pad=1)
        grid = torch.stack([im if im is not None else torch.zeros(3, res, res) for im in shapes_chat])
        save_image_grid(grid.view(len(shapes_chat) // n, n, *grid.shape[1:])[:, :8], out / "shapes.png", scale=4, pad=1)


if __name__ == "__main__":
    main()
