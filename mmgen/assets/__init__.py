"""Files shipped inside the package: the bundled default model (`DEFAULT_MODEL`), made by `mmgen.bundle`."""

from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "chat-tiny"
