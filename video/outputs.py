"""Keeping the user's files safe while outputs are written.

- Every output is written under a temporary name next to it (``NAME.streamvsr-tmp.EXT``) and moved into place only
  when complete, so a failed or interrupted run never leaves a half-written file under the name that was asked
  for and never replaces an existing file with a partial one. What such a run did finish is kept under a
  labelled name (``NAME.streamvsr-partial.EXT``).
- An existing output is replaced only when asked for (``overwrite``), and never when it is one of the inputs:
  that is checked by identity (device and inode), so a hard link or a symbolic link to the input counts as the
  input.
- A lock file next to the output (``NAME.streamvsr-lock``) makes a second run to the same output fail at once.
  The lock is the operating system's (``flock``, or ``msvcrt.locking`` on Windows), which dies with its process:
  a lock file left behind by a crashed run is recognised as stale and taken over, and the caller then removes
  the work files that run left (``remove_stale``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from pathlib import Path

from ..models.shared.errors import OutputBusyError, OutputExistsError, OutputMoveError, UserInputError

log = logging.getLogger(__name__)

LOCK_TAG = ".streamvsr-lock"
TMP_TAG = ".streamvsr-tmp"
PARTIAL_TAG = ".streamvsr-partial"
# Windows locks byte ranges and blocks reading them; the lock byte sits far from the holder's description at the
# start of the file, so a refused run can still say who holds the lock.
_WINDOWS_LOCK_OFFSET = 1 << 20


def temp_path(path) -> Path:
    """Where ``path`` is written until it is complete: the same folder, so that the final move is a rename on
    one file system (atomic), and the same extension, from which muxers and image writers take the format."""
    path = Path(path)
    return path.with_name(f"{path.stem}{TMP_TAG}{path.suffix}")


def partial_path(path, number: int = 1) -> Path:
    """Where the finished part of an incomplete output is kept, labelled as such; ``number`` > 1 for the later
    ones of the same output (``free_partial_path``)."""
    path = Path(path)
    tag = PARTIAL_TAG if number == 1 else f"{PARTIAL_TAG}-{number}"
    return path.with_name(f"{path.stem}{tag}{path.suffix}")


def free_partial_path(path) -> Path:
    """The first partial name of ``path`` not in use: an older partial result is never replaced (called under
    the output's lock, so no other run of this output takes the name meanwhile)."""
    number = 1
    while os.path.lexists(partial_path(path, number)):
        number += 1
    return partial_path(path, number)


def lock_path(target) -> Path:
    target = Path(os.path.abspath(target))
    if not target.name:  # a file-system root as the output folder: the lock has to go inside it
        return target / LOCK_TAG
    return target.with_name(target.name + LOCK_TAG)


def same_file(a, b) -> bool:
    """Whether two paths name the same file (hard links and symbolic links included), also where one is not
    there yet: ``new/../in.mp4`` is ``in.mp4`` once the folder ``new`` exists."""
    try:
        if os.path.samefile(a, b):
            return True
    except (OSError, ValueError):
        pass
    try:
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))
    except (OSError, ValueError):
        return False


def check_folder_creatable(folder) -> None:
    """Raise a one-line error unless ``folder`` exists as a writable folder or can be created, without creating
    anything (so that a run refused later leaves no trace)."""
    folder = Path(os.path.abspath(folder))
    probe = folder
    while not probe.exists():
        if os.path.lexists(probe):
            raise UserInputError(f"cannot create the folder {folder}: {probe} is a broken symbolic link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == folder else f"cannot create the folder {folder}: "
        raise UserInputError(f"{where}{probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        why = f"{probe} is on a read-only file system (a write-protected or read-only mounted drive)" \
            if _read_only(probe) else f"no permission to write in {probe}"
        raise UserInputError(f"cannot write to {folder}: {why}")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # (no statvfs on Windows)
        return False


def make_folder(folder) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot create the output folder {folder}: {e.strerror or e}") from None
    return folder


# What a resumable job's work files add to its output's name: NAME.streamvsr-resume.safetensors.tmp (a checkpoint
# being saved); any job's: NAME.streamvsr-partial-NN.EXT (a result kept after a stop)
RESUME_NAME_EXTRA = len(".streamvsr-resume.safetensors.tmp")
WORK_NAME_EXTRA = len(PARTIAL_TAG) + len("-99")


def check_name_length(out, extra: int = WORK_NAME_EXTRA, prefix: str | None = None, added: int = 0) -> None:
    """A one-line error where ``out``'s name, with the ``extra`` characters its work files add to it, is longer
    than its file system takes (found at the first work file otherwise, after the model has loaded). Counted as
    the file system counts: bytes of UTF-8 on Linux, UTF-16 units on Windows. ``prefix``: the setting the name was
    made from (ComfyUI's filename_prefix), which the advice then names, with the ``added`` (ASCII) characters
    that the name has beyond it."""
    limit, name = 255, os.path.basename(out)
    folder = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    with contextlib.suppress(AttributeError, OSError, ValueError):  # (no pathconf on Windows: 255 there)
        limit = os.pathconf(folder, "PC_NAME_MAX")
    unit = "characters" if os.name == "nt" else "bytes"
    length = len(name.encode("utf-16-le")) // 2 if os.name == "nt" else len(os.fsencode(name))
    if 0 < limit < length + extra:  # (-1: no limit)
        advice = f"shorten it to at most {limit - extra} {unit}" if prefix is None else \
            f"shorten the file name of {prefix} to at most {limit - extra - added} {unit}"
        raise UserInputError(f"the output name {name[:40]}… is too long: {length} {unit}, and the work files "
                             f"next to it add {extra} to it, where the file system takes {limit}; {advice}")


def check_output_file(out, inputs=(), overwrite: bool = False, work_files=()) -> None:
    """The checks for one output file: not a folder, not one of ``inputs`` (paths; other sources are skipped),
    not already there unless ``overwrite``, and its folder can be created. No input may be one of the files a run
    writes, replaces or removes next to the output either: its temporary name, its lock and ``work_files``."""
    out = Path(out)
    check_name_length(out)
    if out.is_dir():
        raise UserInputError(f"the output {out} is a folder; give a file name")
    for source in inputs:
        if isinstance(source, (str, os.PathLike)) and same_file(source, out):
            how = "" if os.path.abspath(source) == os.path.abspath(out) else \
                " (the same file under another name: a hard link or symbolic link to it)"
            raise UserInputError(f"the output {out} is the input {source}{how}; choose another output name")
    work = [temp_path(out), lock_path(out), *work_files]
    for source in inputs:
        if isinstance(source, (str, os.PathLike)):
            taken = next((w for w in work if same_file(source, w)), None)
            if taken is not None:
                also = "" if os.path.abspath(source) == os.path.abspath(taken) else f" (as {taken})"
                raise UserInputError(f"the input {source} is a work file of the output {out}{also}, which the run "
                                     "would replace or remove; rename the input or choose another output name")
    if out.exists() and not out.is_file():
        raise UserInputError(f"the output {out} exists and is not a regular file (a device, pipe or socket); "
                             "give a file name")
    if os.path.lexists(out) and not overwrite:
        raise OutputExistsError(f"{out} already exists; add --overwrite to replace it (it is replaced only once the "
                                "new file is complete)")
    check_folder_creatable(out.parent)


def publish(tmp, out, overwrite: bool = False, keep_stopped: bool = True) -> Path:
    """Move the finished ``tmp`` to ``out``, its content flushed to the disk first (after a power cut, a file
    under the output's name is whole). Without ``overwrite`` this never replaces a file that appeared at ``out``
    in the meantime (a hard link is created, which fails if the name is taken). Where the move fails, the result is
    kept under the partial name, never left under the temporary name (which the next run removes), and the
    error says where; where it is stopped (Ctrl-C), likewise with ``keep_stopped``, else removed (one frame of a
    folder, which a partial name would add to the frames there)."""
    tmp, out = Path(tmp), Path(out)
    try:
        sync_file(tmp)
        _move_into_place(tmp, out, overwrite)
    except OSError as e:  # (OutputExistsError is not one: the result is then kept already, and said where)
        reason = e.strerror or str(e)
        try:
            kept = keep_partial(tmp, out)
        except OSError:
            raise OutputMoveError(f"could not put the finished result in place as {out} ({reason}); it is still in "
                                  f"{tmp}: move it elsewhere before running again, which removes that file") from None
        raise OutputMoveError(f"could not put the finished result in place as {out} ({reason}; is that file open in "
                              f"another program?); it was kept as {kept}") from None
    except BaseException:  # stopped (Ctrl-C) while the finished result is flushed: not left to the next run's cleanup
        with contextlib.suppress(OSError):
            if not keep_stopped or (os.path.exists(out) and os.path.exists(tmp) and os.path.samefile(tmp, out)):
                tmp.unlink(missing_ok=True)  # (or in place already, under both names)
            elif os.path.exists(tmp):
                log.warning("stopped while the finished result was put in place as %s: it was kept as %s", out,
                            keep_partial(tmp, out))
        raise
    sync_folder(out.parent)
    return out


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        kept = free_partial_path(out)
        os.replace(tmp, kept)
        raise OutputExistsError(f"{out} was created by something else while this run wrote it; it was left alone "
                                f"and the finished result is in {kept}") from None
    except OSError:  # a file system without hard links (FAT, some network shares): check, then rename
        if os.path.lexists(out):
            kept = free_partial_path(out)
            os.replace(tmp, kept)
            raise OutputExistsError(f"{out} was created by something else while this run wrote it; it was left "
                                    f"alone and the finished result is in {kept}") from None
        if os.name == "nt":
            os.rename(tmp, out)  # refuses to replace an existing file on Windows
        else:
            os.replace(tmp, out)
        return
    try:
        os.unlink(tmp)
    except OSError as e:  # the output is in place (a second name of the same data): not worth failing for
        log.warning("could not remove %s (%s); it is a second name of %s", tmp, e.strerror or e, out)


def sync_file(path) -> None:
    """Flush ``path``'s content to the disk: a file that a later step counts on (a checkpoint's segments, a
    result about to replace its work files) must not turn out empty after a power cut."""
    # Windows flushes only a handle open for writing.
    fd = os.open(path, (os.O_RDWR | os.O_BINARY) if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system without fsync: nothing to flush to
            raise
    finally:
        os.close(fd)


def sync_folder(folder) -> None:
    """Flush a folder's entries (a rename or a new name in it) to the disk, where the system allows it (not on
    Windows, whose NTFS journals them)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def keep_partial(tmp, out) -> Path | None:
    """Keep an unfinished ``tmp`` under a free partial name of ``out`` (an older partial result stays). Returns
    where it is, or None if there was nothing."""
    tmp = Path(tmp)
    if not tmp.exists():
        return None
    kept = free_partial_path(out)
    os.replace(tmp, kept)
    return kept


def remove_stale(paths, why: str = "left by a run that did not finish") -> None:
    """Delete work files of an earlier run. Only called while holding the output's lock, so they cannot belong
    to a run still in progress."""
    for path in paths:
        path = Path(path)
        if os.path.lexists(path):
            try:
                path.unlink()
            except OSError as e:
                raise UserInputError(f"cannot remove {path}, {why}: {e.strerror or e}") from None
            log.info("removed %s, %s", path, why)


# ---------------------------------------------------------------------------------------------------- the lock

_held: dict[str, list] = {}  # lock key -> [thread id, depth, fd, lock file]: the locks this process holds
_held_guard = threading.Lock()


class OutputLock:
    """Exclusive right to write ``target`` (a file or a folder), held with ``with OutputLock(target):``.

    The same thread may take it again while holding it (the command line takes it before loading the model, and
    the job it runs takes it again); any other taker, in this process or another, gets ``OutputBusyError`` at
    once. ``stale`` tells whether a lock file from a run that ended without cleaning up was taken over.
    """

    def __init__(self, target):
        self.target = Path(target)
        self.path = lock_path(target)
        self.key = str(self.path)  # stays the same if the lock file has to go elsewhere (see _open)
        self.stale = False

    def __enter__(self) -> "OutputLock":
        key, me = self.key, threading.get_ident()
        with _held_guard:
            entry = _held.get(key)
            if entry is not None:
                if entry[0] != me:
                    raise OutputBusyError(f"{self.target} is being written by another job in this program; wait "
                                          "for it to finish or choose another output")
                entry[1] += 1
                return self
        fd = self._acquire()
        with _held_guard:
            _held[key] = [me, 1, fd, self.path]
        return self

    def __exit__(self, *exc) -> None:
        with _held_guard:
            entry = _held[self.key]
            entry[1] -= 1
            if entry[1]:
                return
            del _held[self.key]
        _release(entry[2], entry[3])

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            inside = self.target / LOCK_TAG
            if os.path.isdir(self.target) and self.path != inside:  # (Path.is_dir raises for a name too long)
                # An output folder in a folder we may not write to: the lock goes inside it instead (every run
                # to this folder meets the same permissions, so all of them look there).
                self.path = inside
                return self._open()
            raise UserInputError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None

    def _acquire(self) -> int:
        for _ in range(10):
            fd, held = self._open(), False
            try:
                locked = _try_lock(fd, self.path)
                if not locked:
                    raise OutputBusyError(self._busy_message(_read_holder(fd)))
                # The run we waited for may have deleted the file between our open and our lock: then this lock
                # is on a file nobody else sees. Start again on the file now at the path.
                try:
                    current = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except OSError:
                    current = False
                if not current:
                    os.close(fd)
                    continue
                held = True
                before = _read_holder(fd)
                if before:
                    self.stale = True
                    log.info("%s: took over the lock of an earlier run that ended without cleaning up (%s)",
                             self.target, before)
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                try:
                    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}, since "
                                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
                except OSError as e:  # (a full disk: said with the place, before anything else is tried)
                    raise OSError(e.errno, e.strerror, str(self.path)) from None
                return fd
            except BaseException:
                if held:  # (ours alone: the lock file goes, as when the run ends)
                    _release(fd, self.path)
                else:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                raise
        raise OutputBusyError(self._busy_message(""))

    def _busy_message(self, holder: str) -> str:
        who = f" ({holder})" if holder else ""
        return (f"{self.target} is being written by another streamvsr run{who}; wait for it to finish or choose "
                f"another output (lock file {self.path})")


def _release(fd: int, path: Path) -> None:
    """Close a held lock's descriptor and delete its file."""
    if os.name == "nt":  # an open file cannot be deleted there; closing first leaves a harmless moment
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
    else:  # delete while still holding the lock, so nobody can take a lock on a file about to vanish
        with contextlib.suppress(OSError):
            path.unlink()
        with contextlib.suppress(OSError):
            os.close(fd)


def _try_lock(fd: int, path) -> bool:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:
            # Held by another: EACCES (EDEADLOCK after retries). Anything else is a file system without byte
            # locks (some cloud drives and mounts), which would otherwise refuse every run as "busy".
            if e.errno in (errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK)):
                return False
            return _without_lock(path, e)
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return _without_lock(path, e)
        raise
    return True


def _without_lock(path, error: OSError) -> bool:
    log.warning("cannot lock %s on this file system (%s): a second run to the same output would not be stopped",
                path, error.strerror or error)
    return True


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode("utf-8", "replace").strip()
    except OSError:
        return ""
