"""Files shipped inside the package: the bundled models, made by `mmgen.bundle`.

    chat-tiny   the default of `Chat`, `mmgen generate | caption | score | chat | serve`: digits, shapes,
                conversation about both, and edits
    edit-tiny   the default of `mmgen edit`: edits of one or two shapes only, made more reliably

`--model` and `Chat.from_pretrained` take a bundled model's name wherever they take a directory.
"""

from pathlib import Path

BUNDLED = {name: Path(__file__).parent / name for name in ("chat-tiny", "edit-tiny")}
DEFAULT_MODEL = BUNDLED["chat-tiny"]
EDIT_MODEL = BUNDLED["edit-tiny"]


def model_directory(name_or_path: str | Path | None, default: Path = DEFAULT_MODEL) -> Path:
    """The directory `name_or_path` means: `default` for None, a bundled model for its name (unless a directory
    of that name exists here), else the path itself."""
    if name_or_path is None:
        return default
    path = Path(name_or_path)
    return BUNDLED[str(name_or_path)] if str(name_or_path) in BUNDLED and not path.exists() else path
