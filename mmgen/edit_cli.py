"""`mmgen edit IMAGE "INSTRUCTION" -o out.png`: change one image as the instruction says (`Chat.edit`).

    mmgen edit circle.png "make the circle blue" -o blue.png      # prints the path and the model's answer

The model must have been trained to edit (the bundled model is: its data has `mmgen.data.edits`
conversations). Exactly one input image; the output is checked before the model loads.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

from mmgen.arguments import integer, text
from mmgen.errors import InputError


def cmd_edit(args) -> None:
    """Read the image, ask the model, save the drawn image atomically, print its path and the answer."""
    from mmgen.chat import Chat
    from mmgen.cli import _image_format, _load, _options
    from mmgen.files import atomic_write
    from mmgen.outputs import check_output_file, output_error

    if len(args.image) != 1:
        raise InputError(f"mmgen edit changes one image, got {len(args.image)} ({', '.join(args.image)}); run it "
                         "once per image")
    out = Path(args.output)
    check_output_file(out, "-o", create=False)  # before the model loads: a bad -o fails in a second
    fmt = _image_format(out, grid=False)
    options = _options(args, max_new_tokens=48, temperature=args.temperature or 0.0, max_images=1)
    chat = Chat(_load(args), options)
    edited = chat.edit(Path(args.image[0]), args.instruction, seed=args.seed, scale=args.scale)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        edited.image.save(buf, format=fmt)
        atomic_write(out, buf.getvalue())
    except OSError as e:
        raise output_error(e, out, "-o") from None
    print(out)
    print(edited.text)


def add_edit_parser(sub, sampling_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("edit", help="change an image as an instruction says",
                       description="Draw IMAGE changed as INSTRUCTION says (e.g. 'make the circle blue'), save it "
                                   "to -o and print the model's answer. The model must be trained to edit (the "
                                   "bundled one is).")
    p.add_argument("image", nargs="+", help="the image file to change (one)")
    p.add_argument("instruction", type=text, help="what to change, e.g. 'move the square to the top'")
    p.add_argument("-o", "--output", default="edited.png", help="image file (.png, .jpg, .webp)")
    p.add_argument("--scale", type=integer(1, 64), default=8, help="nearest-neighbour upscaling of the saved image")
    sampling_args(p)
    p.set_defaults(fn=cmd_edit)
