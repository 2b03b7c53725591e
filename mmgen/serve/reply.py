"""One choice of a chat completion, assembled from its row's engine events.

A text segment's ids are decoded together (pieces join as SentencePiece means them) and handed out
as deltas. Text that could still become a stop string, or ends in an incomplete character, is held
back until it cannot; a stop string ends the reply just before it. The streamed deltas and images
are exactly the parts of the non-streamed reply, so both modes give the same answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from mmgen.events import ImageDone, ImageStart, RowDone, Token

INCOMPLETE = "\ufffd"  # what a partial UTF-8 character decodes to


class Reply:
    """The answer of one row: `parts` (text strings and PIL images, in order), `finish_reason`
    ("stop" | "length" once done), `stopped` (a stop string ended it: the row can be cancelled),
    and `completion_tokens` (text tokens, plus the positions each image takes).

    Args:
        tokenizer: decodes id lists (`decode`).
        stop: strings that end the reply (not included).
        image_tokens: the positions one image takes in the context (<boi>, its tokens, <eoi>).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), image_tokens: int = 0):
        self.tokenizer, self.stop, self.image_tokens = tokenizer, list(stop), image_tokens
        self.parts: list[str | Image.Image] = []
        self.finish_reason: str | None = None
        self.stopped = False
        self.completion_tokens = 0
        self._ids: list[int] = []  # the current text segment
        self._text, self._sent = "", 0  # its decoded text; how much of it was handed out

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, event) -> list[str | Image.Image]:
        """Take one engine event of this row; return what is new to send (text deltas and images)."""
        if self.done:
            return []
        if isinstance(event, Token):
            self.completion_tokens += 1
            self._ids.append(event.id)
            self._text = self.tokenizer.decode(self._ids)
            return self._release(final=False)
        if isinstance(event, ImageStart):
            self.completion_tokens += self.image_tokens
            return self._release(final=True)
        if isinstance(event, ImageDone):
            self.parts.append(event.image)
            return [event.image]
        if isinstance(event, RowDone):
            out = self._release(final=True)
            self.finish_reason = "length" if event.reason == "length" else "stop"
            return out
        return []

    def content(self) -> str | list[str | Image.Image]:
        """The whole answer: one string when it is text only, else the list of parts."""
        if all(isinstance(p, str) for p in self.parts):
            return "".join(self.parts)
        return self.parts

    def _release(self, final: bool) -> list[str]:
        """Hand out the text that is settled; `final` ends the segment (all of it is settled)."""
        text, end = self._text, len(self._text)
        hits = [i for i in (text.find(s, max(0, self._sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            end, final = min(hits), True
            self.stopped, self.finish_reason = True, "stop"
        elif not final:
            end -= self._held(text)
        delta = text[self._sent:end]
        self._sent = max(self._sent, end)
        if delta:
            if self.parts and isinstance(self.parts[-1], str) and self._sent > len(delta):
                self.parts[-1] += delta
            else:
                self.parts.append(delta)
        if final:
            self._ids, self._text, self._sent = [], "", 0
        return [delta] if delta else []

    def _held(self, text: str) -> int:
        """How many trailing characters to hold back: a partial character, or the longest tail that
        begins a stop string."""
        held = len(text) - len(text.rstrip(INCOMPLETE))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held
