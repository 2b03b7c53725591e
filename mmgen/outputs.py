"""Where results go, and how a command ends when something fails.

`check_output_file` / `check_output_dir` run before any work starts: they check name lengths, that
no part of the path is a file, and (making the directories) that a file can be created there, so
`mmgen generate -o` into a bad place fails before the model loads, not after the drawing.
`output_error` turns an OSError met while writing into an `OutputError` that names the path, the
reason and the fix. `exit_on_error` runs a command: mmgen's errors and OS errors print one paragraph
`error: ...` on stderr and exit with status 2, Ctrl-C prints `interrupted` and exits with 130, and
anything else (a bug) keeps its traceback; `--debug` or MMGEN_DEBUG=1 re-raises everything.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mmgen.errors import MMGenError, OutputError

T = TypeVar("T")
NAME_MAX = 255  # bytes in one path component on common file systems (ext4, XFS, btrfs, APFS)
PATH_MAX = 4096  # bytes in a whole path on Linux
REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system", errno.ENAMETOOLONG: "file name too long",
           errno.ENOTDIR: "a part of the path is a file, not a directory", errno.EISDIR: "the target is a directory",
           errno.EEXIST: "a file is in the way"}


def disk_full(e: OSError) -> bool:
    """Whether `e` says the disk (or the user's quota) is full."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def output_error(e: OSError, path: str | Path, option: str, fix: str | None = None) -> OutputError:
    """`e`, met while writing `path`, as an OutputError naming the reason, the path and the fix: `fix`,
    else "free space or choose another OPTION" for a full disk, "choose another OPTION" otherwise.
    The result keeps `e.errno`."""
    reason = REASONS.get(e.errno) or (e.strerror or str(e) or type(e).__name__)
    advice = fix or (f"free space or choose another {option}" if disk_full(e) else f"choose another {option}")
    error = OutputError(f"{reason} while writing {path}; {advice}")
    error.errno = e.errno
    return error


def check_name_lengths(path: str | Path, option: str) -> None:
    """Raise OutputError if a component of `path` is over NAME_MAX bytes or the whole over PATH_MAX."""
    for part in Path(path).parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            shown = part if len(part) <= 40 else part[:40] + "…"
            raise OutputError(f"{option} {shown!r}: this name is {size} bytes long, over the file system's "
                              f"limit of {NAME_MAX}; choose a shorter {option}")
    if len(os.fsencode(os.path.abspath(path))) >= PATH_MAX:
        raise OutputError(f"{option}: the path is over {PATH_MAX} bytes long; choose a shorter {option}")


def _probe(directory: Path, option: str) -> None:
    """Create and delete a temporary file in `directory`; raise OutputError if that fails."""
    try:
        fd, name = tempfile.mkstemp(prefix=".mmgen-probe-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise output_error(e, directory, option) from None


def check_output_dir(path: str | Path, option: str, create: bool = True, given: str | Path | None = None) -> Path:
    """Check that output directory `path` can be written, before any work; returns it as a Path.

    Args:
        option: how the user gave it ("--out-dir"), named in messages with the fix.
        create: make the directory (and its parents) now; else only check its nearest existing
            ancestor, so that nothing appears on disk until something is written.
        given: what the user gave, if not `path` itself (a file in it), for messages.
    Raises:
        OutputError: a name is too long, `path` or one of its parents is a file, or it is not writable.
    """
    path, given = Path(path), Path(given or path)
    check_name_lengths(given, option)
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        where = "is a file" if base == given else f"cannot be written: {base} is a file"
        raise OutputError(f"{option} {given} {where}, not a directory; choose another {option}")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise output_error(e, path, option) from None
    _probe(path if create else base, option)
    return path


def check_output_file(path: str | Path, option: str, create: bool = True) -> Path:
    """Check that file `path` can be written, before any work; `create` makes its parent directories
    now (see `check_output_dir`).

    Raises:
        OutputError: `path` is a directory, a parent is a file, a name is too long, or the directory
            is not writable; the message names the path and `option`.
    """
    path = Path(path)
    check_name_lengths(path, option)  # first: is_dir() itself fails on an over-long name
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory; give a file name, e.g. {option} {path / 'out.png'}")
    check_output_dir(path.parent, option, create, given=path)
    return path


# -- the command line's error report ------------------------------------------------------------------


def debug_requested() -> bool:
    """Whether MMGEN_DEBUG asks for full tracebacks (any value but empty or 0)."""
    return os.environ.get("MMGEN_DEBUG", "") not in ("", "0")


def error_message(e: BaseException) -> str:
    """The paragraph printed for `e`: its message (an OSError's reason and file), without blank lines."""
    if isinstance(e, OSError) and not isinstance(e, MMGenError) and e.errno is not None:
        reason = REASONS.get(e.errno) or e.strerror or str(e)
        if disk_full(e):
            text = f"{reason} while writing {e.filename or 'an output'}; free space or write elsewhere"
        else:
            text = f"{reason}: {e.filename}" if e.filename else reason
    else:
        text = str(e) or type(e).__name__
    return re.sub(r"\n\s*\n", "\n", text).strip()


def exit_on_error(body: Callable[[], T], debug: bool = False) -> T:
    """Run a command's `body` and return its result; mmgen's errors and OS errors exit with status 2
    after one `error: ...` paragraph on stderr, Ctrl-C with status 130 after `interrupted`. Other
    exceptions (bugs) propagate with their traceback; so does everything when `debug` or MMGEN_DEBUG."""
    if debug or debug_requested():
        return body()
    try:
        return body()
    except KeyboardInterrupt:
        _report("interrupted")
        raise SystemExit(130) from None
    except (MMGenError, OSError) as e:
        _report(f"error: {error_message(e)}")
        raise SystemExit(2) from None


def _report(line: str) -> None:
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
