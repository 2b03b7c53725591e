"""Why a frozen-text digits model does or does not draw the prompted digit: two probes of one model directory.

    python benchmarks/frozen_probe.py runs/pretrained-demo/digits-frozen [more model directories]

1 prompt keys/values  For the ten prompts "a handwritten digit D", the keys and values each layer computes at
                      the last prompt token (the digit), through the text weights: the norm of their mean over the
                      ten digits and the mean distance of a digit's vector from that mean. A drawing image reads
                      the prompt only through these; under --model.freeze=text they are the pretrained LLM's and
                      never change, so a small spread is a prompt the image experts can hardly tell apart.
2 reading the image   log p("a handwritten digit D" | image) for one held-out image of each digit (Pipeline.score):
                      the share of images whose best-scoring prompt is their own digit, the caption direction.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mmgen.data.digits import DigitsDataset
from mmgen.pipeline import Pipeline

PROMPT = "a handwritten digit {}"


def prompt_spread(pipe: Pipeline) -> list[dict]:
    """Per layer: |mean| and mean |x - mean| of the keys and of the values at the digit token over the ten digits."""
    model, tok = pipe.model, pipe.builder.tok
    per_digit = []  # per digit, per layer: (keys, values) of the last token, each (K·E,)
    for d in range(10):
        ids = torch.tensor([[tok.bos_id, *tok.encode(PROMPT.format(d))]])  # (1, T)
        t = ids.shape[1]
        with torch.no_grad():  # the forward returns each layer's keys/values (B, K, T, E), RoPE applied
            _, kv = model(model.embed(ids), torch.arange(t)[None], torch.zeros(1, t, dtype=torch.long),
                          torch.full((1, t), -1))
        per_digit.append([(k[0, :, -1].flatten(), v[0, :, -1].flatten()) for k, v in kv])
    rows = []
    for layer in range(len(per_digit[0])):
        row = {"layer": layer}
        for j, name in enumerate(("keys", "values")):
            x = torch.stack([per_digit[d][layer][j] for d in range(10)])  # (10, K·E)
            mean = x.mean(0)
            row[name] = (mean.norm().item(), (x - mean).norm(dim=1).mean().item())
        rows.append(row)
    return rows


def reading(pipe: Pipeline) -> float:
    """The share of ten held-out images (one per digit) whose own prompt scores best (log p(prompt | image))."""
    data = DigitsDataset("test")
    images = [data.images[int(np.flatnonzero(data.labels == d)[0])] for d in range(10)]
    scores = np.stack([pipe.score(images, PROMPT.format(d)).total.numpy() for d in range(10)], axis=1)  # (10, 10)
    return float((scores.argmax(1) == np.arange(10)).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="mmgen model directories")
    args = p.parse_args()
    torch.set_num_threads(1)
    for path in args.models:
        pipe = Pipeline.from_pretrained(path)
        print(f"\n{path}\n| layer | keys: mean norm | keys: spread | spread / norm | values: mean norm | "
              "values: spread | spread / norm |\n|---|---|---|---|---|---|---|")
        for r in prompt_spread(pipe):
            (kn, ks), (vn, vs) = r["keys"], r["values"]
            print(f"| {r['layer']} | {kn:.2f} | {ks:.2f} | {ks / kn:.2f} | {vn:.2f} | {vs:.2f} | {vs / vn:.2f} |")
        share = reading(pipe)
        print(f"own prompt scores best for {share:.0%} of 10 held-out images (one per digit)")


if __name__ == "__main__":
    main()
