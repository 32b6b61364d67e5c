"""Fetching files from the Hugging Face hub into a folder, with hash checks and resumable downloads."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import DownloadError
from .weights import sha256_of

log = logging.getLogger(__name__)


def download_command(repo: str, dest, files=()) -> str:
    """The hub client's own command that fetches ``files`` of ``repo`` (all of it where none are given) into
    ``dest``: ``hf`` since huggingface_hub 0.34 (its later releases no longer install ``huggingface-cli``), the old
    name where an older client is installed."""
    try:
        from importlib.metadata import version

        major, minor = (int(part) for part in version("huggingface_hub").split(".")[:2])
        old = (major, minor) < (0, 34)
    except Exception:  # noqa: BLE001 - not installed or an unusual version string: the current name
        old = False
    names = "".join(f" {name}" for name in files)
    return f"{'huggingface-cli' if old else 'hf'} download {repo}{names} --local-dir {dest}"


# A download that failed on this machine's side: no network would not help
_LOCAL = {"ENOSPC": "the disk is full", "EDQUOT": "the disk quota is used up", "EFBIG": "the file is too large for "
          "this file system", "EACCES": "no permission to write there", "EPERM": "no permission to write there",
          "EROFS": "the file system is read-only"}


def local_failure(error: BaseException, dest) -> str | None:
    """What to do where ``error`` is this machine's failure to store a download in ``dest`` (a full disk, no
    permission), else None."""
    import errno

    codes = {getattr(errno, name): why for name, why in _LOCAL.items() if hasattr(errno, name)}
    if isinstance(error, OSError) and error.errno in codes:
        return f"{codes[error.errno]} ({dest}): free space there or choose another folder, then download again"
    return None


def check_sha256(path: Path, name: str, sha: str | None, fresh: bool = False) -> None:
    """Delete ``path`` and raise when its sha256 does not start with ``sha`` (a full digest or a prefix).
    ``fresh``: the file was just downloaded (the hub client checked its size), so the repository may have
    changed since these digests were taken: the message says what to do then."""
    if sha is not None and not sha256_of(path).startswith(sha):
        path.unlink(missing_ok=True)
        if fresh:
            raise DownloadError(f"{name} as downloaded is not the published file this version of ComfyUI-StreamVSR "
                                f"knows (its sha256 does not start with {sha[:12]}); it was deleted. Download it "
                                "again; if it fails the same way, the file on the hub has changed: update "
                                "ComfyUI-StreamVSR, and report it if the newest version fails too.")
        raise DownloadError(f"{name} is corrupt: its sha256 does not start with {sha[:12]}; it was deleted, "
                            "download it again.")


def download_files(repo: str, files: dict[str, str | None], dest, manual: str, progress=None) -> Path:
    """Fetch ``files`` (name in the repository -> sha256 or prefix, or None) of ``repo`` into ``dest``.

    Files already there are kept (and hash-checked where the hash is known), so an interrupted download resumes
    where it stopped; the hub client also resumes a partly downloaded file and checks sizes against the server.
    ``manual`` is appended to every error: how to get the files by hand. ``progress(done, total)``: called before
    the first missing file and after each one (files, not bytes); it may raise to stop between files.
    """
    dest = Path(dest)
    for name, sha in files.items():
        if (dest / name).is_file():
            check_sha256(dest / name, name, sha)
    missing = [name for name in files if not (dest / name).is_file()]
    if not missing:
        return dest
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DownloadError("downloading needs huggingface_hub (pip install huggingface_hub). " + manual) from None
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {dest}: {e}") from None
    log.info("downloading %d files of %s into %s", len(missing), repo, dest)
    for done, name in enumerate(missing):
        if progress is not None:
            progress(done, len(missing))
        try:
            path = Path(hf_hub_download(repo, name, local_dir=str(dest)))
        except Exception as e:  # offline, DNS, HTTP and hub errors come in many types
            local = local_failure(e, dest)
            if local is not None:
                raise DownloadError(f"could not save {name} of https://huggingface.co/{repo}: {local}") from None
            raise DownloadError(f"could not download {name} from https://huggingface.co/{repo} "
                                f"({type(e).__name__}: {e}). " + manual) from None
        check_sha256(path, name, files[name], fresh=True)
    if progress is not None:
        progress(len(missing), len(missing))
    return dest
