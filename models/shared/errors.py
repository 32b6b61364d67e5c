"""One error hierarchy for the whole pack.

``StreamVSRError`` and its subclasses are the user's to fix (a wrong file, no network, a bad option): the command
line prints them as one ``error: ...`` line and exits with status 2, the nodes show the message. Anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os


def cannot_read(path) -> str | None:
    """Why the file ``path`` cannot be opened for reading, in the system's words and with what to do about a
    permission; None when it can be, or is not there or is a folder (each caller says that in its own words).
    Checked before a library opens the file: safetensors reports every failure to open as "No such file", and
    the rest would be taken for a damaged file, which the advice for those would have the user delete."""
    if not os.path.lexists(path) or os.path.isdir(path):
        return None
    try:
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        return None
    except OSError as e:
        why = e.strerror or type(e).__name__
        if getattr(e, "winerror", None) in (32, 33):  # Windows: another program holds it open, or a part of it
            why += "; close the program that has it open (a download, a virus scanner) and run again"
        elif e.errno in (errno.EACCES, errno.EPERM):
            why += "; give the user that runs this read access to it"
        return f"cannot read {path} ({why})"


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message (its type's name when it has none), at most ``limit`` characters:
    what a one-line report of a foreign library's error can hold."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class StreamVSRError(Exception):
    """A problem the user can fix; the message says how."""


class UserInputError(StreamVSRError, ValueError):
    """An input (frames, video, option value) that cannot be used as given."""


class WeightsError(StreamVSRError, ValueError):
    """A checkpoint file is missing, truncated, or does not match the model."""


class DownloadError(StreamVSRError, RuntimeError):
    """Weights could not be fetched (offline, server error, corrupt download)."""


class OutputExistsError(UserInputError):
    """The output is already there and replacing it was not asked for (``--overwrite``)."""


class OutputBusyError(StreamVSRError, RuntimeError):
    """Another run is writing the same output right now (it holds the output's lock)."""


class OutputMoveError(StreamVSRError, RuntimeError):
    """A finished output could not be moved to its name (the file there is open elsewhere, no permission); the
    message says where the result was kept instead."""


class PrecisionError(StreamVSRError, RuntimeError):
    """The model's arithmetic left the range of its precision: its output holds inf or NaN."""


class SessionLimitError(StreamVSRError, RuntimeError):
    """This process reached a limit of its own (e.g. how many shapes it compiles); restarting it clears it."""


class InputDamagedError(UserInputError):
    """The input ends early or cannot be decoded past some point.

    ``frames``: how many output frames were written before it broke; ``path``: where they are (None if nowhere).
    """

    def __init__(self, message: str, frames: int = 0, path=None):
        super().__init__(message)
        self.frames, self.path = frames, path
