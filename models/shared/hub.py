"""Fetching files from the Hugging Face hub into a folder, with hash checks and resumable downloads."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

from .errors import DownloadError
from .weights import sha256_of

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
# A file being taken from the Hugging Face cache: ".NAME" + this, beside NAME
PART_TAG = ".streamvsr-part"
# The cache's blob of a Git LFS file is named by its sha256; weights are always such files
_LFS_BLOB = re.compile(r"[0-9a-f]{64}")
WEIGHTS = (".safetensors", ".bin", ".ckpt", ".pth", ".pt")


def _hub_constants():
    """huggingface_hub's settings as read from the environment (HF_ENDPOINT, HF_HUB_OFFLINE), or None where it
    is not installed."""
    import importlib

    try:
        return importlib.import_module("huggingface_hub.constants")
    except ImportError:
        return None


def hub_url(repo: str) -> str:
    """``repo``'s page on the hub the client talks to: a mirror set with HF_ENDPOINT is where the user can reach
    the files by hand too."""
    endpoint = getattr(_hub_constants(), "ENDPOINT", None) or DEFAULT_ENDPOINT
    return f"{endpoint.rstrip('/')}/{repo}"


def offline_mode() -> bool:
    """HF_HUB_OFFLINE is set (the client then refuses every download and blames the connection)."""
    return bool(getattr(_hub_constants(), "HF_HUB_OFFLINE", False))


def shell_command(args) -> str:
    """``args`` as one command line that the user's shell reads back as the same words (a path with a space or
    an umlaut stays one argument)."""
    if os.name == "nt":
        import subprocess

        return subprocess.list2cmdline([str(a) for a in args])
    import shlex

    return shlex.join(str(a) for a in args)


def _hub_cli(*words: str) -> list[str]:
    """The hub client's command ``words``: ``hf`` since huggingface_hub 0.34 (its later releases no longer install
    ``huggingface-cli``), the old name (and ``login`` for ``auth login``) where an older client is installed."""
    try:
        from importlib.metadata import version

        major, minor = (int(part) for part in version("huggingface_hub").split(".")[:2])
        old = (major, minor) < (0, 34)
    except Exception:  # noqa: BLE001 - not installed or an unusual version string: the current name
        old = False
    if not old:
        return ["hf", *words]
    return ["huggingface-cli", *(["login"] if words == ("auth", "login") else words)]


def download_command(repo: str, dest, files=()) -> str:
    """The hub client's own command that fetches ``files`` of ``repo`` (all of it where none are given) into
    ``dest``."""
    return shell_command([*_hub_cli("download", repo, *files), "--local-dir", dest])


# A download that failed on this machine's side: no network would not help
_LOCAL = {"ENOSPC": "the disk is full", "EDQUOT": "the disk quota is used up", "EFBIG": "the file is too large for "
          "this file system", "EACCES": "no permission to write there", "EPERM": "no permission to write there",
          "EROFS": "the file system is read-only"}
# ... or something in the way of the files (a file named like a folder, HF_HOME pointing at a file)
_IN_THE_WAY = {"ENOTDIR": "a file stands where a folder is needed", "EEXIST": "a file or folder of that name is "
               "in the way", "EISDIR": "a folder stands where a file is needed"}


def local_failure(error: BaseException, dest) -> str | None:
    """What to do where ``error`` is this machine's failure to store a download in ``dest`` (a full disk, no
    permission, a file in the way), else None. The path named is the one the system refused, where it says."""
    import errno

    if not isinstance(error, OSError):
        return None
    where = error.filename or dest
    if error.errno == errno.ENOTDIR and error.filename:  # name the file in the way, not the path below it
        where = next((p for p in (Path(where), *Path(where).parents) if p.exists() and not p.is_dir()), where)
    for table, advice in ((_LOCAL, "free space there or choose another folder"),
                          (_IN_THE_WAY, "move it away or choose another folder")):
        codes = {getattr(errno, name): why for name, why in table.items() if hasattr(errno, name)}
        if error.errno in codes:
            return f"{codes[error.errno]} ({where}): {advice}, then download again"
    return None


def check_sha256(path: Path, sha: str | None) -> None:
    """Delete the file ``path`` just downloaded and raise when its sha256 does not start with ``sha`` (a full
    digest or a prefix). The hub client checked its size, so the repository may have changed since these
    digests were taken: the message says what to do then."""
    if sha is not None and not sha256_of(path).startswith(sha):
        path.unlink(missing_ok=True)
        raise DownloadError(f"{path} as downloaded is not the published file this version of ComfyUI-StreamVSR "
                            f"knows (its sha256 does not start with {sha[:12]}); it was deleted. Download it "
                            "again; if it fails the same way, the file on the hub has changed: update "
                            "ComfyUI-StreamVSR, and report it if the newest version fails too.")


def mismatching(dest: Path, files: dict[str, str | None]) -> list[str]:
    """The names of ``files`` already in ``dest`` whose sha256 is known and differs: all of them, so that one
    message names every file that will be replaced."""
    return [name for name, sha in files.items()
            if sha is not None and (dest / name).is_file() and not sha256_of(dest / name).startswith(sha)]


def set_aside(path: Path) -> Path:
    """Rename ``path`` to a free ``NAME.mismatch`` beside it and return that: the user's file is kept until a
    verified download has taken its place."""
    aside, n = path.with_name(path.name + ".mismatch"), 1
    while aside.exists():  # one kept from an earlier run is not overwritten either
        n += 1
        aside = path.with_name(f"{path.name}.mismatch{n}")
    try:
        os.replace(path, aside)
    except OSError as e:
        raise DownloadError(f"cannot move {path} aside to replace it ({e.strerror or e}): move or delete it, then "
                            "download again") from None
    return aside


def put_back(aside: Path, path: Path) -> Path:
    """Undo ``set_aside`` after a failed or stopped download, and return where the user's file is now: at
    ``path``, unless a verified copy is there (another download put it there meanwhile) or it cannot be moved."""
    if not path.exists():
        try:
            os.replace(aside, path)
            return path
        except OSError:  # the error being raised names where the file is
            log.warning("could not move %s back to %s", aside, path)
    return aside


def _set_aside_before(path: Path) -> list[Path]:
    """The ``NAME.mismatch``, ``NAME.mismatch2``, ... beside ``path``, oldest first."""
    found = []
    for p in path.parent.glob(path.name.translate({ord(c): f"[{c}]" for c in "*?["}) + ".mismatch*"):
        number = p.name[len(path.name) + len(".mismatch"):]
        if number == "" or number.isdigit():
            found.append((int(number or 1), p))
    return [p for _, p in sorted(found)]


def set_aside_note(folder: Path) -> str:
    """A sentence for an error about files missing from ``folder``, where a stopped download set one aside (its
    user may be looking for it), else ""."""
    aside = sorted(folder.glob("*.mismatch*")) if folder.is_dir() else []
    return (f" {aside[0]} was set aside by a download that stopped (it is not the published file): run the "
            "download again (the loader's '(download) …' entry, or `streamvsr download`), which puts it back and "
            "replaces it, or rename it back." if aside else "")


def restore_set_aside(dest: Path, files) -> None:
    """The files a download that was killed (a closed terminal, a restarted ComfyUI) left set aside: put back where
    their name is free, so that they are checked and kept like any other file there; where a verified copy took
    their name meanwhile, named once, for the user to delete."""
    for name in files:
        path = dest / name
        for aside in reversed(_set_aside_before(path)):  # the latest first
            if not path.exists():
                try:
                    os.replace(aside, path)
                    log.info("put back %s, set aside by a download that did not finish", path)
                except OSError as e:
                    log.warning("%s is your %s, set aside by a download that did not finish, and it could not be "
                                "renamed back (%s): rename it to %s by hand", aside, name, e.strerror or e, path.name)
                continue
            log.warning("%s is an earlier %s (not the published file) that a download set aside, and %s is there "
                        "now: delete %s where it is not needed", aside, name, path, aside.name)


def _fetch(hf_hub_download, repo: str, name: str, dest: Path, manual: str) -> Path:
    try:
        return Path(hf_hub_download(repo, name, local_dir=str(dest)))
    except Exception as e:  # offline, DNS, HTTP and hub errors come in many types
        local = local_failure(e, dest)
        if local is not None:
            raise DownloadError(f"could not save {name} of {hub_url(repo)}: {local}") from None
        # (the hub client's messages run over several lines, with request ids)
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        login = shell_command(_hub_cli("auth", "login"))
        access = (f" The hub refused access: check your token (HF_TOKEN, or `{login}`), and that you accepted the "
                  "repository's terms on its page." if "Gated" in type(e).__name__ or " 401 " in f" {reason} "
                  or " 403 " in f" {reason} " else "")
        raise DownloadError(f"could not download {name} from {hub_url(repo)} ({type(e).__name__}: {reason}).{access} "
                            + manual) from None


def _from_cache(repo: str, name: str, path: Path, sha: str | None) -> bool | str:
    """Put ``name`` of ``repo`` at ``path`` from the Hugging Face cache, where the user has it already (the
    official code or another tool fetched it with ``from_pretrained``): the cache's newest copy, only the published
    file where its sha256 is known. A large file stored by its sha256 (Git LFS) becomes a second name of the same
    data where the cache is on the same drive; any other is copied (the hub client, run later on this folder as the
    errors suggest, copies such a file from its cache over ours, which fails where both are one file). False where
    the cache has no such file; where it has one that cannot be read or put there, why (then it is downloaded,
    which says what fails)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, name)
    except Exception:  # noqa: BLE001 - an older client, or a cache it cannot read: download instead
        return False
    if not isinstance(cached, str) or not os.path.isfile(cached):
        return False
    tmp = path.with_name(f".{path.name}{PART_TAG}")
    try:
        if sha is not None and not sha256_of(Path(cached)).startswith(sha):
            log.info("the Hugging Face cache's %s of %s is not the published file: downloading it", name, repo)
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # (left by a run that was killed)
        blob = os.path.realpath(cached)
        try:
            # (a cache without links, as on Windows without developer mode, keeps the file under its own name)
            if not (sha is not None or _LFS_BLOB.fullmatch(os.path.basename(blob)) or name.endswith(WEIGHTS)):
                raise OSError("copied, not linked")
            os.link(blob, tmp)
        except OSError:  # a small file, another drive, or a file system without hard links
            shutil.copyfile(cached, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        why = f"it could not be put there ({cached}: {e.strerror or e})"
        log.warning("could not take %s from the Hugging Face cache (%s: %s): downloading it", name, cached,
                    e.strerror or e)
        return why
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("took %s from the Hugging Face cache (%s)", path, cached)
    return True


def download_files(repo: str, files: dict[str, str | None], dest, manual: str, progress=None,
                   before_last=None) -> Path:
    """Fetch ``files`` (name in the repository -> sha256 or prefix, or None) of ``repo`` into ``dest``.

    Files already there are kept, so an interrupted download resumes where it stopped; the hub client also resumes
    a partly downloaded file and checks sizes against the server. A file there whose known hash differs is
    downloaded again; the file is kept (as NAME.mismatch while its replacement downloads, put back if that fails or
    is stopped) until a verified download has replaced it: a user's file is never lost to a failed download.
    ``manual`` is appended to every error: how to get the files by hand. ``progress(done, total)``: called before
    the first missing file and after each one (files, not bytes); it may raise to stop between files.
    ``before_last()``: run once every other file is in place, before the last of ``files`` is fetched (or at the
    end where it is there already): a file from elsewhere that must be in place before the folder counts as a model.
    """
    dest = Path(dest).absolute()  # every message names the files where they are on disk
    restore_set_aside(dest, files)
    wrong = mismatching(dest, files)
    if wrong:
        log.warning("not the published files (their sha256 differs), to be replaced by a verified download: %s",
                    ", ".join(str(dest / name) for name in wrong))
    missing = [name for name in files if name in wrong or not (dest / name).is_file()]
    if not missing:
        if before_last is not None:
            before_last()
        return dest

    try:
        import huggingface_hub  # noqa: F401 - (said before any folder is made)
    except ImportError:
        raise DownloadError("downloading needs huggingface_hub (pip install huggingface_hub). " + manual
                            + _kept(dest, wrong, {})) from None
    offline = offline_mode()
    with folder_for_download(dest):
        _fetch_missing(repo, files, missing, wrong, dest, manual, offline, progress, before_last)
    return dest


@contextlib.contextmanager
def folder_for_download(folder: Path):
    """Makes ``folder`` and its missing parents for a download, and removes those it made again if the download
    fails (or is stopped) before anything came into them: an empty model folder would be listed as a model."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # (deepest first)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {folder}: {local_failure(e, folder) or e}") from None
    try:
        yield
    except BaseException:
        for made_folder in made:
            try:
                made_folder.rmdir()
            except OSError:  # (it holds something: it stays, and so do the folders above it)
                break
        raise


def _kept(dest: Path, names, where: dict) -> str:
    """Appended to an error: the files whose sha256 differs are still there, as they were (``where``: those kept
    elsewhere)."""
    left = [str(where.get(name, dest / name)) for name in names]
    return f" Kept as they were, though their sha256 is not the published one: {', '.join(left)}." if left else ""


def _fetch_missing(repo, files, missing, wrong, dest: Path, manual: str, offline: bool, progress, before_last):
    """``download_files``' downloads into ``dest``, which exists."""
    from huggingface_hub import hf_hub_download

    replaced: set[str] = set()
    where: dict[str, Path] = {}  # a file set aside that could not go back (another download took its name)

    def kept() -> str:
        return _kept(dest, [name for name in wrong if name not in replaced], where)

    log.info("downloading %d files of %s into %s", len(missing), repo, dest)
    for done, name in enumerate(missing):
        if progress is not None:
            progress(done, len(missing))
        if before_last is not None and name == list(files)[-1]:
            before_last, run = None, before_last
            run()
        path = dest / name
        aside = set_aside(path) if name in wrong else None
        try:
            took = _from_cache(repo, name, path, files[name])
            if took is not True:
                if offline:
                    cache = f"the Hugging Face cache has it, but {took}" if took else \
                        "the Hugging Face cache has no published copy of it either"
                    raise DownloadError(f"HF_HUB_OFFLINE is set: unset it to download {name} of {repo} into {dest} "
                                        f"({cache}). " + manual)
                check_sha256(_fetch(hf_hub_download, repo, name, dest, manual), files[name])
        except DownloadError as e:
            if aside is not None:
                where[name] = put_back(aside, path)
            raise DownloadError(str(e) + kept()) from None
        except BaseException:  # stopped (Cancel, Ctrl-C), maybe with an unverified download in place already
            if aside is not None:
                path.unlink(missing_ok=True)
                put_back(aside, path)
            raise
        if aside is not None:
            aside.unlink(missing_ok=True)
            replaced.add(name)
            log.info("replaced %s (not the published file) with the verified download", path)
    if before_last is not None:
        before_last()
    if progress is not None:
        progress(len(missing), len(missing))
