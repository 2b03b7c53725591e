"""Short templated conversations over the bundled digits and shapes: the chat data of the bundled model.

Each item is a list of `Message`s (rendered by `mmgen.chat_template.render` when tokenized):

    draw      user asks for a digit or a shape; the assistant answers with a sentence and the image
    describe  user shows a real image and asks about it; the assistant names the digit or the shape
    talk      greetings, thanks, "what can you do?": text only
    multi     two or three turns: a greeting, a drawing, then "what did you draw?" (or describe, then
              "draw another one")
Requests and answers come in several phrasings, sometimes capitalized or punctuated, so that
"Draw a red circle!" and "can you draw the number seven?" both work. Everything is drawn from the
per-item `rng`, so an item differs from epoch to epoch and is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from mmgen.chat_template import Message
from mmgen.data.digits import WORDS, DigitsDataset
from mmgen.data.images import fit_tensor
from mmgen.data.shapes import ShapeObject, ShapesDataset, caption
from mmgen.data.source import Source

DRAW_DIGIT = ("draw a handwritten digit {d}", "draw the digit {d}", "can you draw a {w}", "please draw the number {w}",
              "show me a handwritten {d}", "write the digit {w}", "i would like a picture of the digit {d}",
              "a handwritten digit {d}", "draw a {d}", "make an image of the number {d}")
DRAW_SHAPE = ("draw {x}", "can you draw {x}", "please draw {x}", "show me {x}", "make an image of {x}",
              "i would like a picture of {x}", "{x}")
DREW = ("here is {x}.", "sure! here is {x}.", "here you go: {x}.", "ok, {x}.")
ASK_ANY = ("what is this", "what do you see", "describe this image", "what is in this picture", "what is it",
           "can you describe this")
ASK_DIGIT = ("which digit is this", "what number is this", "what digit do you see")
ASK_SHAPE = ("what shape is this", "what color is it", "what is in this image")
SAY_DIGIT = ("a handwritten digit {d}.", "this is the digit {d}.", "it is a handwritten {w}.", "the number {w}.")
SAY_SHAPE = ("{x}.", "i see {x}.", "it is {x}.")
AFTER_DRAW = ("what did you draw", "what is in the image", "what is that", "describe your picture")
SAY_DREW = ("i drew {x}.", "it is {x}.", "{x}.")
ANOTHER = ("draw another one", "can you draw another one", "another one please")
TALK = (
    (("hello", "hi", "hi there", "hey", "good morning"),
     ("hello! i can draw handwritten digits and colored shapes, and tell you what is in an image.",
      "hi! ask me to draw a digit or a shape, or show me an image.")),
    (("what can you do", "help", "who are you", "what are you"),
     ("i am a small multimodal model: i can draw handwritten digits and colored shapes, and describe images.",
      "i draw digits and shapes, and i can tell you which digit or shape is in an image.")),
    (("thanks", "thank you", "great", "nice"), ("you are welcome!", "glad to help!")),
    (("bye", "goodbye", "see you"), ("goodbye!", "bye! come back to draw more.")),
)


def _style(text: str, rng: random.Random, question: bool = False) -> str:
    """Vary how a user types: capitalized or not, with or without final punctuation."""
    if rng.random() < 0.4:
        text = text[0].upper() + text[1:]
    end = rng.choice(("?", "") if question else (".", "!", ""))
    return text + end


class DialogueSource(Source):
    """`n` conversations over the training digits and procedural single-object shapes.

    Args:
        n: items per epoch.
        seed: seed of the shapes.
        channels, resolution: the model's image format.
        digits_split: the digits the images come from (keep "test" held out).
        loss_on: "all" (LM labels on every text token) or "assistant" (on assistant turns only).
    """

    name = "dialogues"

    def __init__(self, n: int, seed: int, channels: int, resolution: int, digits_split: str = "train",
                 loss_on: str = "all"):
        self.n, self.channels, self.resolution, self.loss_on = n, channels, resolution, loss_on
        self.digits = DigitsDataset(digits_split)
        self.by_label = [[i for i in range(len(self.digits)) if int(self.digits.labels[i]) == d] for d in range(10)]
        self.shapes = ShapesDataset(size=max(n, 1000), resolution=max(resolution, 8), max_objects=1, seed=seed + 7)

    def __len__(self) -> int:
        return self.n

    # -- subjects: (image, short name, long name) ---------------------------------------------------

    def _digit(self, rng: random.Random, label: int | None = None):
        d = rng.randrange(10) if label is None else label
        image = fit_tensor(self.digits.images[rng.choice(self.by_label[d])], self.channels, self.resolution)
        return image, {"d": d, "w": WORDS[d]}

    def _shape(self, rng: random.Random):
        i = rng.randrange(len(self.shapes))
        image, _ = self.shapes[i]
        obj: ShapeObject = self.shapes.objects(i)[0]
        article = "an" if obj.color[0] in "aeiou" else "a"
        short = f"{article} {obj.color} {obj.shape}"
        return fit_tensor(image, self.channels, self.resolution), {"short": short, "long": caption([obj])}

    def _draw_turn(self, rng: random.Random) -> tuple[list[Message], str]:
        """A request and its answer; returns the messages and the answer's description."""
        if rng.random() < 0.5:
            image, names = self._digit(rng)
            request = rng.choice(DRAW_DIGIT).format(**names)
            x = rng.choice(("a handwritten digit {d}", "a handwritten {w}", "the digit {d}")).format(**names)
        else:
            image, names = self._shape(rng)
            x = names["short"] if rng.random() < 0.5 else names["long"]  # with or without the position
            request = rng.choice(DRAW_SHAPE).format(x=x)
            x = names["long"]  # the answer says where it drew it
        return [Message("user", [_style(request, rng, request.startswith("can"))]),
                Message("assistant", [rng.choice(DREW).format(x=x), image])], x

    def _describe_turn(self, rng: random.Random) -> tuple[list[Message], dict, bool]:
        digit = rng.random() < 0.5
        image, names = self._digit(rng) if digit else self._shape(rng)
        ask = rng.choice(ASK_ANY + (ASK_DIGIT if digit else ASK_SHAPE))
        answer = (rng.choice(SAY_DIGIT).format(**names) if digit else rng.choice(SAY_SHAPE).format(x=names["long"]))
        return [Message("user", [image, _style(ask, rng, True)]), Message("assistant", [answer])], names, digit

    def _talk_turn(self, rng: random.Random) -> list[Message]:
        asks, answers = rng.choice(TALK)
        return [Message("user", [_style(rng.choice(asks), rng, True)]), Message("assistant", [rng.choice(answers)])]

    def sample(self, i: int, rng: random.Random) -> list[Message]:
        kind = rng.random()
        if kind < 0.35:
            return self._draw_turn(rng)[0]
        if kind < 0.65:
            return self._describe_turn(rng)[0]
        if kind < 0.75:
            return self._talk_turn(rng)
        messages = self._talk_turn(rng) if rng.random() < 0.5 else []
        if rng.random() < 0.7:
            turn, x = self._draw_turn(rng)
            follow = [Message("user", [_style(rng.choice(AFTER_DRAW), rng, True)]),
                      Message("assistant", [rng.choice(SAY_DREW).format(x=x)])]
        else:
            turn, names, digit = self._describe_turn(rng)
            if digit:  # "draw another one": a different real digit of the same class
                image, names = self._digit(rng, names["d"])
                x = rng.choice(("another handwritten {w}", "another digit {d}")).format(**names)
                follow = [Message("user", [_style(rng.choice(ANOTHER), rng)]),
                          Message("assistant", [rng.choice(DREW).format(x=x), image])]
            else:
                follow = self._draw_turn(rng)[0]
        return messages + turn + follow

    def texts(self) -> Iterator[str]:
        """Every phrase the conversations use (for training the text tokenizer)."""
        rng = random.Random(0)
        for _ in range(min(self.n, 4000)):
            for m in self.sample(0, rng):
                for p in m.parts:
                    if isinstance(p, str):
                        yield p
