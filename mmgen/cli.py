"""`mmgen train | train-text-tokenizer | generate | caption | score | edit | chat | serve | export-hf |
train-tokenizer | compare-tokenizers`: the command-line entry points.

Outputs are checked before any work starts. A failure mmgen expects (its errors, a file that cannot be
read or written) prints one paragraph `error: ...` and exits with status 2; Ctrl-C exits with 130; a
bug keeps its traceback. `mmgen --debug ...` (or MMGEN_DEBUG=1) shows every traceback. See docs/errors.md.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

from mmgen.arguments import Parser, integer, shift, text
from mmgen.diffusion.samplers import SAMPLERS
from mmgen.errors import InputError, ModelFileError, OptionError
from mmgen.export_hf import add_export_parser
from mmgen.files import CONFIG_FILE, DTYPES, atomic_write, load_device, save_image_grid
from mmgen.outputs import check_output_dir, check_output_file, exit_on_error, output_error
from mmgen.sampling import MAX_BEST_OF, MAX_SEED
from mmgen.serve.cli import add_serve_parser
from mmgen.tokenizer_cli import add_tokenizer_parsers


MODEL_HELP = "model directory from `mmgen train`, or a bundled model: chat-tiny (the default), edit-tiny"


def _sampling_args(p: argparse.ArgumentParser, temperature: str = "text temperature (0 = greedy)",
                   model_help: str = MODEL_HELP) -> None:
    p.add_argument("--model", default=None, help=model_help)
    add_load_args(p)
    p.add_argument("--seed", type=integer(0, MAX_SEED), default=0)
    p.add_argument("--steps", type=integer(1), default=None,
                   help="denoising steps (default: 25 in the backbone; the MLP head's own per token for hybrid/mar)")
    p.add_argument("--image-temperature", type=float, default=1.0,
                   help="codes: sampling temperature; MLP head: scale of its starting noise")
    p.add_argument("--image-top-k", type=integer(0), default=0, help="codes: top-k (0 = off)")
    p.add_argument("--sampler", default="euler", choices=sorted(SAMPLERS))
    p.add_argument("--schedule", default="uniform", choices=["uniform", "karras"])
    p.add_argument("--shift", type=shift, default="1.0",
                   help="flow shift of the uniform schedule, or 'auto' (from the token count)")
    p.add_argument("--eta", type=float, default=None, help="noise of ddim / dpmpp_2m_sde (default: theirs)")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale w (1 = off)")
    p.add_argument("--guidance-kind", default="cfg", choices=["cfg", "apg"])
    p.add_argument("--apg-eta", type=float, default=1.0, help="APG weight of the parallel component")
    p.add_argument("--apg-norm", type=float, default=0.0, help="APG norm cap r (0 = none)")
    p.add_argument("--apg-momentum", type=float, default=0.0, help="APG momentum β")
    p.add_argument("--rescale", type=float, default=0.0, help="CFG rescale φ")
    p.add_argument("--threshold", default=None, choices=["imagen", "mimic"], help="dynamic thresholding")
    p.add_argument("--interval", type=float, nargs=2, default=None, metavar=("SIGMA_LO", "SIGMA_HI"),
                   help="guide only for σ in this range")
    p.add_argument("--cache-threshold", type=float, default=0.0, help="First Block Cache τ (0 = off)")
    p.add_argument("--temperature", type=float, default=None, help=temperature)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=integer(0), default=0)


def add_load_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype: where the model loads and the dtype of its weights (see docs/generation_speed.md)."""
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="weights' dtype: bf16 on GPUs that have it (norms and softmax stay fp32 inside)")


def _options(args, **overrides):
    from mmgen.diffusion.guidance import Guidance
    from mmgen.generation import GenerationOptions

    guidance = Guidance(
        scale=args.guidance, kind=args.guidance_kind, eta=args.apg_eta, norm_threshold=args.apg_norm,
        momentum=args.apg_momentum, rescale=args.rescale, threshold=args.threshold,
        interval=tuple(args.interval) if args.interval else None,
    )
    kw = dict(image_steps=args.steps, image_temperature=args.image_temperature, image_top_k=args.image_top_k,
              sampler=args.sampler, schedule=args.schedule, shift=args.shift, eta=args.eta, guidance=guidance,
              cache_threshold=args.cache_threshold, top_p=args.top_p, top_k=args.top_k)
    if args.temperature is not None:
        kw["temperature"] = args.temperature
    return GenerationOptions(**{**kw, **overrides})


def _load(args, default: Path | None = None):
    from mmgen.assets import BUNDLED, DEFAULT_MODEL, model_directory
    from mmgen.pipeline import Pipeline

    device = load_device(args.device)  # a bad --device fails before the files are read
    d = model_directory(args.model, default or DEFAULT_MODEL)
    if not (d / CONFIG_FILE).is_file():
        raise ModelFileError(f"{d} is not a model directory (no config.json); give the output directory of "
                             f"`mmgen train`, a bundled model's name ({', '.join(BUNDLED)}), or leave out --model "
                             "for the bundled default")
    return Pipeline.from_pretrained(d, device, args.dtype)


def _image_format(path: Path, grid: bool) -> str:
    """The PIL format that `-o` names by its extension; raises OptionError for none PIL can write."""
    from PIL import Image

    fmt = Image.registered_extensions().get(path.suffix.lower())
    if grid and fmt != "PNG":
        raise OptionError(f"-o {path}: --grid saves a PNG file; end the name in .png")
    if fmt is None or fmt not in Image.SAVE:
        raise OptionError(f"-o {path}: {path.suffix or 'no extension'} is not an image format mmgen can write; "
                          "end the name in .png (or .jpg, .webp)")
    return fmt


def cmd_generate(args) -> None:
    """`mmgen generate PROMPT`: draw images and save them as image files (or one PNG grid)."""
    import torch

    from mmgen.pipeline import to_pil

    out = Path(args.output)
    paths = [out] if args.n == 1 or args.grid else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(args.n)]
    for path in paths:  # before the model loads: a bad -o fails in a second, not after the drawing
        check_output_file(path, "-o", create=False)
    fmt = _image_format(out, args.grid and args.n > 1)
    options = _options(args, best_of=args.best_of)
    pipe = _load(args)
    with _progress(args.steps, "draw") as tick:  # the n images (× best_of) are drawn together, one tick per step
        if args.best_of > 1:
            best = pipe.draw_best([args.prompt] * args.n, options, seed=args.seed, progress=tick)
            images = [b.image for b in best]
        else:
            best, images = [], pipe.draw([args.prompt] * args.n, options, seed=args.seed, progress=tick)
    target = out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.grid and args.n > 1:
            save_image_grid(torch.stack(images), out, scale=args.scale)
        else:
            for target, image in zip(paths, images, strict=True):
                buf = io.BytesIO()
                to_pil(image, args.scale).save(buf, format=fmt)
                atomic_write(target, buf.getvalue())  # whole or not at all
    except OSError as e:
        raise output_error(e, target, "-o") from None
    print("\n".join(map(str, paths)))
    for i, b in enumerate(best):
        print(f"image {i}: best of {args.best_of} (seed {b.seeds[b.index]}), log p(prompt | image) = "
              f"{b.scores[b.index]:.3f}; candidates: {' '.join(f'{x:.3f}' for x in b.scores.tolist())}")


def read_images(pipe, paths: list[str]) -> list[tuple[str, object]]:
    """(path, image tensor) for each readable file, in order; each unreadable one is named on stderr."""
    readable = []
    for path in paths:
        try:
            readable.append((path, pipe.image(Path(path))))
        except InputError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
    return readable


def fail_if_unread(paths: list[str], readable: list, missing: str) -> None:
    """After the readable files were handled: fail (status 2) if any file could not be read."""
    failed = len(paths) - len(readable)
    if failed:
        raise InputError(f"{failed} of {len(paths)} image file(s) could not be read (each is named above); "
                         f"their {missing} are missing")


def cmd_caption(args) -> None:
    """`mmgen caption IMAGE...`: print "PATH<tab>caption" per readable image, in order; each unreadable
    one is reported on stderr, and then the command fails (status 2)."""
    options = _options(args, max_new_tokens=args.max_new_tokens, temperature=args.temperature or 0.0,
                       max_images=0)
    pipe = _load(args)
    readable = read_images(pipe, args.images)
    captions = pipe.caption([image for _, image in readable], options) if readable else []
    for (path, _), caption in zip(readable, captions):
        print(f"{path}\t{caption}")
    fail_if_unread(args.images, readable, "captions")


def cmd_score(args) -> None:
    """`mmgen score IMAGE... --prompt TEXT`: print "PATH<tab>score<tab>per token" per readable image, best
    first (the model's log-likelihood of the prompt given the image, `mmgen.scoring`); unreadable files are
    reported on stderr, and then the command fails (status 2)."""
    pipe = _load(args)
    readable = read_images(pipe, args.images)
    if readable:
        scores = pipe.score([image for _, image in readable], args.prompt)
        order = scores.total.argsort(descending=True, stable=True).tolist()
        for i in order:
            print(f"{readable[i][0]}\t{scores.total[i]:.4f}\t{scores.per_token[i]:.4f}")
    fail_if_unread(args.images, readable, "scores")


def cmd_edit(args) -> None:
    """`mmgen edit IMAGE "INSTRUCTION" -o OUT`: change one image as the instruction says (`Chat.edit`); save
    the drawn image atomically, print its path and the model's answer."""
    from mmgen.assets import EDIT_MODEL
    from mmgen.chat import Chat

    if len(args.image) != 1:
        raise InputError(f"mmgen edit changes one image, got {len(args.image)} ({', '.join(args.image)}); run it "
                         "once per image")
    out = Path(args.output)
    check_output_file(out, "-o", create=False)  # before the model loads: a bad -o fails in a second
    fmt = _image_format(out, grid=False)
    options = _options(args, max_new_tokens=48, temperature=args.temperature or 0.0, max_images=1)
    chat = Chat(_load(args, EDIT_MODEL), options)
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


def cmd_chat(args) -> None:
    """`mmgen chat`: the interactive chat (or the scripted lines of -m)."""
    from mmgen.chat import Chat
    from mmgen.chat_repl import run

    check_output_dir(args.out_dir, "--out-dir", create=False)  # made when the first image is saved
    defaults = _options(args, max_new_tokens=args.max_new_tokens, temperature=args.temperature or 0.0)
    run(Chat(_load(args), defaults), args.message or None, args.out_dir, scale=args.scale, seed=args.seed)


class _progress:
    """A tqdm bar advanced by each drawing step's `ImageStep` event (its total comes from the event)."""

    def __init__(self, total: int | None, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty())

    def __enter__(self):
        def tick(step) -> None:
            if self.bar.total != step.steps:
                self.bar.reset(total=step.steps)
            self.bar.update(1)

        return tick

    def __exit__(self, *exc):
        self.bar.close()


def main(argv: list[str] | None = None) -> None:
    """Run the command in `argv` (default: the process arguments). mmgen's errors and OS errors print one
    paragraph and exit with status 2, Ctrl-C exits with 130; `--debug` anywhere (or MMGEN_DEBUG=1) keeps
    the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if hasattr(sys.stdout, "reconfigure"):  # file names with undecodable bytes are printed as those bytes
        sys.stdout.reconfigure(errors="surrogateescape")
    if argv and argv[0] == "train":
        from mmgen.train.entrypoint import main as train_main

        start = time.perf_counter()
        if train_main(argv[1:], debug=debug) is not None:
            print(f"done in {time.perf_counter() - start:.0f} s")
        return
    if argv and argv[0] == "train-text-tokenizer":
        from mmgen.train.text_tokenizer import main as text_tokenizer_main

        text_tokenizer_main(argv[1:], debug=debug)
        return
    args = build_parser().parse_args(argv)
    exit_on_error(lambda: args.fn(args), debug)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command but `train` and `train-text-tokenizer` (listed for --help only)."""
    parser = Parser(prog="mmgen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error (also after the command, or MMGEN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    # `train` and `train-text-tokenizer` parse their own arguments (typed config overrides); listed here for --help
    sub.add_parser("train", help="train a model from a config (default: the bundled digits job, then its "
                                 "evaluation); `mmgen train --help` lists every key", add_help=False)
    sub.add_parser("train-text-tokenizer", help="train a SentencePiece text tokenizer on your corpus", add_help=False)

    p = sub.add_parser("generate", help="draw images from a caption")
    p.add_argument("prompt", type=text)
    p.add_argument("-o", "--output", default="out.png", help="image file (.png, .jpg, .webp); with -n > 1, "
                                                               "NAME_0.png, NAME_1.png, ... unless --grid")
    p.add_argument("-n", type=integer(1), default=1, help="number of images")
    p.add_argument("--grid", action="store_true", help="save the n images as one grid")
    p.add_argument("--scale", type=integer(1, 64), default=8, help="nearest-neighbour upscaling of the saved PNG")
    p.add_argument("--best-of", type=integer(1, MAX_BEST_OF), default=1,
                   help="draw this many candidates per image and keep the one the model itself scores best "
                        "(log p(prompt | image)); prints the scores")
    _sampling_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("caption", help="caption image files")
    p.add_argument("images", nargs="+")
    p.add_argument("--max-new-tokens", type=integer(1), default=24)
    _sampling_args(p)
    p.set_defaults(fn=cmd_caption)

    p = sub.add_parser("score", help="rank images by how well the model finds they show a text",
                       description="Print each image's score, best first: PATH, log p(prompt <eos> | image) summed "
                                   "over the prompt's tokens, and per token (the image -> caption direction).")
    p.add_argument("images", nargs="+")
    p.add_argument("--prompt", type=text, required=True, help="the text to score the images against")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    add_load_args(p)
    p.set_defaults(fn=cmd_score)
    _add_edit_parser(sub)

    p = sub.add_parser("chat", help="talk with the model: text and images in, text and images out",
                       description="Interactive chat. /image TEXT forces an image, /text TEXT text only, /attach PATH "
                                   "adds an image to your next message, /reset, /quit. Images are saved under "
                                   "--out-dir and their paths printed.")
    p.add_argument("-m", "--message", action="append", default=None,
                   help="run these lines (messages or /commands) in order instead of reading stdin; repeatable")
    p.add_argument("--out-dir", default="chat_images", help="where generated images are saved")
    p.add_argument("--scale", type=integer(1, 64), default=8, help="nearest-neighbour upscaling of saved images")
    p.add_argument("--max-new-tokens", type=integer(1), default=48)
    _sampling_args(p, temperature="text temperature (default 0 = greedy)")
    p.set_defaults(fn=cmd_chat)
    add_serve_parser(sub)
    add_export_parser(sub)
    add_tokenizer_parsers(sub)
    return parser


def _add_edit_parser(sub) -> None:
    p = sub.add_parser("edit", help="change an image as an instruction says",
                       description="Draw IMAGE changed as INSTRUCTION says (e.g. 'make the circle blue'), save it "
                                   "to -o and print the model's answer. The model must be trained to edit (both "
                                   "bundled ones are; edit-tiny, the default, is the more reliable).")
    p.add_argument("image", nargs="+", help="the image file to change (one)")
    p.add_argument("instruction", type=text, help="what to change, e.g. 'move the square to the top'")
    p.add_argument("-o", "--output", default="edited.png", help="image file (.png, .jpg, .webp)")
    p.add_argument("--scale", type=integer(1, 64), default=8, help="nearest-neighbour upscaling of the saved image")
    _sampling_args(p, model_help="model directory from `mmgen train`, or a bundled model: edit-tiny (the default), "
                                 "chat-tiny")
    p.set_defaults(fn=cmd_edit)


if __name__ == "__main__":
    main()
