"""`mmgen train [CONFIG] [--key.sub=value ...] [--resume [PATH]]`, also `python -m mmgen.train` and
`accelerate launch [--multi_gpu --num_processes N] -m mmgen.train`: one parser, one code path.

CONFIG is a YAML/JSON file or the name of a config shipped with mmgen; without one, the bundled
default job (`digits-tiny`) runs. Problems with the config, the data, a checkpoint or the output
directory (checked before the data are indexed), and a full disk, end the command with one paragraph
saying what is wrong and how to fix it (exit status 2), not a traceback; `--debug` keeps the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

USAGE = """usage: mmgen train [CONFIG] [--KEY=VALUE ...] [--resume [PATH] | --overwrite] [--print-config] [--debug] [--help]
       python -m mmgen.train ...      accelerate launch --multi_gpu --num_processes 2 -m mmgen.train ...

CONFIG   a YAML or JSON file, or a config shipped with mmgen: {names} (default: {default})
--KEY=VALUE   set any key below (also --KEY VALUE); lists: --data.sources.0.path=DIR or YAML, e.g.
              --samples.prompts='[a red circle, a blue square]'
--resume [PATH]   continue exactly from the newest checkpoint in OUT/checkpoints, or from PATH
--overwrite       start afresh in an OUT that holds a run (deletes its checkpoints and model; without it, refused)
--print-config    print the resolved config as YAML and exit
--debug           show the full traceback of an error (also MMGEN_DEBUG=1)
Short forms: {aliases}

Keys, with types, defaults and meaning (the built-in defaults, which a config file overrides; model keys
show the tiny preset's values):
"""


# Short flags of the original `mmgen train` (README commands keep working) -> config keys.
ALIASES = {"train-steps": "train.steps", "batch-size": "train.batch_size", "lr": "optim.lr", "preset": "model.preset",
           "objective": "model.diffusion.objective", "threads": "train.threads",
           "interface": "model.image.interface", "image-tokenizer": "model.image_tokenizer",
           "eval-per-digit": "eval.digits"}


def parse_argv(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], set[str]]:
    """argv -> (config name or path, [(dotted key, raw value)], flags)."""
    from mmgen.errors import ConfigError

    config, overrides, flags = None, [], set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help", "--print-config", "--debug"):
            flags.add("help" if arg == "-h" else arg[2:])
            continue
        if not arg.startswith("--"):
            if config is not None:
                raise ConfigError(f"two configs given ({config!r} and {arg!r}); give one, and options as --KEY=VALUE")
            config = arg
            continue
        key, eq, value = arg[2:].partition("=")
        key = ALIASES.get(key, key)
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            if key == "resume":  # a bare --resume means the newest checkpoint; a config after it is not its value
                value = "latest"
                if nxt is not None and not nxt.startswith("--") and (Path(nxt).exists() or not _names_config(nxt)):
                    value, i = nxt, i + 1
            elif nxt is not None and not nxt.startswith("--"):
                value, i = nxt, i + 1
            else:
                value = "true"  # a bare boolean switch
        overrides.append((key, value))
    return config, overrides, flags


def _names_config(arg: str) -> bool:
    """Whether `arg` reads as a config (a .yaml / .yml / .json name, or a shipped config's name)."""
    from mmgen.train.config import named_configs

    return arg.endswith((".yaml", ".yml", ".json")) or arg in named_configs()


def main(argv: list[str] | None = None, debug: bool = False) -> Path | None:
    """Run the training command; returns the run directory (None for --help / --print-config). Errors
    print one paragraph and exit with status 2 (see `mmgen.outputs.exit_on_error`); `debug` or a
    `--debug` argument keeps their traceback."""
    from mmgen.outputs import exit_on_error

    argv = sys.argv[1:] if argv is None else argv
    return exit_on_error(lambda: _train(argv), debug or "--debug" in argv)


def _train(argv: list[str]) -> Path | None:
    from mmgen.outputs import check_output_dir
    from mmgen.train.config import DEFAULT_CONFIG, help_text, load_config, named_configs
    from mmgen.train.overrides import to_dict
    from mmgen.train.trainer import run

    name, overrides, flags = parse_argv(argv)
    if "help" in flags:
        aliases = ", ".join(f"--{a} = --{k}" for a, k in ALIASES.items())
        print(USAGE.format(names=", ".join(named_configs()), default=DEFAULT_CONFIG, aliases=aliases) + help_text())
        return None
    config = load_config(name, overrides)
    if "print-config" in flags:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return None
    check_output_dir(config.out, "--out")
    return run(config)
