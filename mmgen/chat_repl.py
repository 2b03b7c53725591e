"""`mmgen chat`: an interactive conversation in the terminal (or a scripted one with `-m`).

Text is printed as it is written; each image is saved under `--out-dir` (upscaled `--scale`×) and
its path printed. Commands: `/image TEXT` asks for an answer that starts with an image, `/text TEXT`
for a text-only answer, `/attach PATH` adds an image to your next message (to ask about it, or to edit
it: "/attach circle.png" then "make it blue"), `/reset` starts over,
`/help`, `/quit` (or Ctrl-D). A bad image, an unknown command, a line that is not valid UTF-8, a
conversation that outgrows the context or an image that cannot be saved prints an error and the
chat goes on.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mmgen.chat import Chat, ImageDone, ImageStart, ImageStep, TextDelta
from mmgen.errors import InputError, MMGenError, OutputError
from mmgen.files import atomic_write
from mmgen.outputs import output_error

HELP = ("commands: /image TEXT (answer with an image), /text TEXT (text only), /attach PATH (an image for your next "
        "message), /reset, /help, /quit")


class Session:
    """One conversation: the history, pending attachments, and where images go.

    Args:
        chat: the loaded model.
        out_dir: directory for generated images.
        scale: upscaling of saved images.
        seed: seed of the first turn (turn k uses seed + k).
        options: generation options for every turn (see `Chat.__call__`).
        write: where text goes (default: stdout, flushed).
    """

    def __init__(self, chat: Chat, out_dir: str | Path, scale: int = 8, seed: int = 0,
                 options: dict | None = None, write: Callable[[str], None] | None = None):
        self.chat, self.out_dir, self.scale, self.seed = chat, Path(out_dir), scale, seed
        self.options = options or {}
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.history: list[dict] = []
        self.attachments: list[Path] = []
        self.turn, self.saved = 0, 0

    def handle(self, line: str) -> bool:
        """Process one input line; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        command, _, rest = line.partition(" ") if line.startswith("/") else ("", "", line)
        if command in ("/quit", "/exit"):
            return False
        if command == "/help":
            self.write(HELP + "\n")
            return True
        if command == "/reset":
            self.history, self.attachments = [], []
            self.write("(conversation cleared)\n")
            return True
        if command == "/attach":
            self.attach(rest.strip())
            return True
        if command not in ("", "/image", "/text"):
            self.write(f"error: unknown command {command}; {HELP}\n")
            return True
        mode = {"/image": "always", "/text": "never"}.get(command, "auto")
        self.say(rest.strip(), mode)
        return True

    def attach(self, path: str) -> None:
        if not path:
            self.write("error: /attach needs a path, e.g. /attach digit.png\n")
            return
        try:
            self.chat.pipe.image(Path(path))  # read it now, so a bad file is reported here
        except InputError as e:
            self.write(f"error: {e}\n")
            return
        self.attachments.append(Path(path))
        self.write(f"(attached {path}: it goes with your next message)\n")

    def say(self, text: str, mode: str = "auto") -> list:
        """Send one user message (with pending attachments); stream and record the answer."""
        content = [*self.attachments, *([text] if text else [])]
        if not content:
            self.write("error: empty message\n")
            return []
        messages = self.history + [{"role": "user", "content": content}]
        parts, bar = [], None
        try:
            self.write("mmgen> ")
            for event in self.chat.stream(messages, seed=self.seed + self.turn, image=mode, **self.options):
                if isinstance(event, TextDelta):
                    self.write(event.text)
                elif isinstance(event, ImageStart):
                    bar = _bar()
                elif isinstance(event, ImageStep) and bar is not None:
                    bar.total = event.steps
                    bar.update(1)
                elif isinstance(event, ImageDone):
                    if bar is not None:
                        bar.close()
                    self.show(event.image)
                else:
                    parts = event.parts
            self.write("\n")
        except MMGenError as e:  # a message the template cannot render, an option or input the model refuses
            self.write(f"\nerror: {e}\n")
            return []
        finally:
            if bar is not None:
                bar.close()
        self.history = messages + [{"role": "assistant", "content": parts or ["…"]}]
        self.attachments = []
        self.turn += 1
        return parts

    def show(self, image) -> None:
        """Save an answer's image and print its path; if it cannot be saved, say why and go on."""
        try:
            self.write(f" [image: {self.save(image)}] ")
        except OutputError as e:
            self.write(f"\nerror: {e}\n")

    def save(self, image) -> Path:
        """Write `image` (upscaled `scale`×) as the next PNG under `out_dir`, atomically; raises OutputError."""
        self.saved += 1
        path = self.out_dir / f"image_{self.saved:03d}.png"
        buf = io.BytesIO()
        image.resize((image.width * self.scale, image.height * self.scale), 0).save(buf, format="PNG")  # 0: nearest
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, buf.getvalue())
        except OSError as e:
            raise output_error(e, path, "--out-dir") from None
        return path


def _bar():
    from tqdm.auto import tqdm

    return tqdm(desc="drawing", leave=False, disable=not sys.stderr.isatty())


def run(chat: Chat, lines: Iterable[str] | None, out_dir: str | Path, scale: int = 8, seed: int = 0,
        options: dict | None = None) -> Session:
    """Run a session on `lines` (a script), or interactively on stdin when `lines` is None. A line that
    is not valid UTF-8 (undecodable bytes arrive as lone surrogates) is reported and skipped."""
    session = Session(chat, out_dir, scale, seed, options)
    interactive = lines is None and sys.stdin.isatty()
    if interactive:
        session.write(f"mmgen chat ({chat.image_size}×{chat.image_size} images go to {out_dir}/); {HELP}\n")
    for number, line in enumerate(_stdin_lines(interactive, session) if lines is None else lines, 1):
        if lines is not None:
            session.write(f"you> {line.encode('utf-8', 'backslashreplace').decode()}\n")
        if _valid_utf8(line, number, session) and not session.handle(line):
            break
    return session


def _stdin_lines(interactive: bool, session: Session) -> Iterator[str]:
    """Lines of stdin until EOF or Ctrl-C at the prompt; bytes that are not UTF-8 become lone surrogates."""
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            yield input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            session.write("\n")
            return


def _valid_utf8(line: str, number: int, session: Session) -> bool:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        session.write(f"error: line {number} is not valid UTF-8 (an undecodable byte at character {e.start + 1}); "
                      "it was skipped: type it again, or check the input's encoding\n")
        return False
    return True
