"""Reading checkpoint files and reporting how they differ from a model, shared by every family.

Pickles are only ever opened with ``weights_only=True``; a damaged file becomes a WeightsError that names the file
and what to download (``hint``), never a bare unpickling traceback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError, cannot_read, first_line
from .runtime import is_out_of_memory

log = logging.getLogger(__name__)


# (device, inode, size, mtime) -> sha256 of the files hashed in this process
_DIGESTS: dict[tuple, str] = {}


def sha256_of(path) -> str:
    """The file's sha256, hashed once per process while it stays unchanged: loading a downloaded model again (a
    ComfyUI loader run after a change of precision) would otherwise read its gigabytes once more."""
    st = Path(path).stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def made_by_convert(metadata) -> bool:
    """Whether a .safetensors file's metadata is that of a file ``streamvsr convert`` wrote (a whole model, made
    here, never downloaded)."""
    return isinstance(metadata, dict) and str(metadata.get("format", "")).startswith("streamvsr/")


def check_weights_file(path, hint: str = "") -> dict | None:
    """A WeightsError saying what a file named as weights really is, when it cannot hold them: a Git LFS pointer
    (a clone without ``git lfs pull``), a saved web page, an empty or cut-short file. Reads only the first bytes
    and a .safetensors header (returned, parsed; None for other files), so loaders check every file before the
    large ones load. A file that cannot be opened (no permission) is a WeightsError in the system's words; a missing
    one is left to the reader to report."""
    import json
    import struct
    import zipfile

    path = Path(path)
    refusal = cannot_read(path)
    if refusal:
        raise WeightsError(refusal)
    tail = f" {hint}" if hint else ""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(512)
            text = head.lstrip().lower()
            if text.startswith(b"version https://git-lfs"):
                raise WeightsError(f"{path} is a Git LFS pointer ({size} bytes), not the weights: the repository "
                                   f"was cloned without `git lfs pull`. Download the file itself.{tail}")
            if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"{\"error\"")):
                raise WeightsError(f"{path} is a web page or error message ({size} bytes), not the weights; use the "
                                   f"file's download (\"resolve\") link.{tail}")
            damaged = f"{path} is damaged ({size:,} bytes): "
            again = f"; delete it and download it again.{tail}"
            if size == 0:
                raise WeightsError(f"{path} is empty{again}")
            if path.suffix.lower() == ".safetensors":
                length = struct.unpack("<Q", head[:8])[0] if size >= 8 else size
                if length > size - 8:
                    raise WeightsError(f"{damaged}cut short before the end of its header{again}")
                f.seek(8)
                try:
                    header = json.loads(f.read(length))
                    end = max([int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"] or [0])
                except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                    raise WeightsError(f"{damaged}not a .safetensors file{again}") from None
                if 8 + length + end > size:
                    if made_by_convert(header.get("__metadata__")):
                        # (made here by `streamvsr convert`, never downloaded; the hint names the downloads)
                        again = "; delete it and convert the model again (`streamvsr convert`)."
                    raise WeightsError(f"{damaged}cut short: its tensors need {8 + length + end:,} bytes{again}")
                return header
            if head.startswith(b"PK") and not zipfile.is_zipfile(f):
                raise WeightsError(f"{damaged}a PyTorch archive that is cut short{again}")
    except OSError:
        pass
    return None


def read_state_dict(path, hint: str = "", unwrap: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a pickled state dict.

    With ``unwrap`` a ``state_dict``/``model`` wrapper and a DataParallel ``module.`` prefix are removed. Entries
    that are not tensors (a training step, a config saved beside the weights) are left out, with a log line, as
    PyTorch's own loading ignores them; a file without a mapping of names to tensors is refused.
    """
    path = Path(path)
    tail = f" {hint}" if hint else ""
    if not path.is_file():
        raise WeightsError(f"weights file {path} {'is a folder' if path.is_dir() else 'does not exist'}.{tail}")
    check_weights_file(path, hint)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/pickle raise assorted types for damaged or hostile files
        if is_out_of_memory(e):
            raise  # a good file too large for the memory left: not a reason to delete it
        raise WeightsError(
            f"cannot read {path} ({path.stat().st_size:,} bytes): {load_reason(e)}. It is not a weights file, or "
            f"it is cut short or damaged, or it holds code rather than tensors: give the weights file, and if this "
            f"is it, delete it and download it again.{tail}") from None
    if unwrap:
        for key in ("state_dict", "model"):
            if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
                state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not any(torch.is_tensor(v) for v in state_dict.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors.{tail}")
    others = sorted(str(k) for k, v in state_dict.items() if not torch.is_tensor(v))
    if others:
        log.info("%s: left out %d entries that are not tensors: %s", path.name, len(others), summary(others))
        state_dict = {k: v for k, v in state_dict.items() if torch.is_tensor(v)}
    if unwrap and state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_reason(error: Exception) -> str:
    """The reader's reason in one line. torch's refusal of a pickle under ``weights_only`` opens with advice to load
    it with ``weights_only=False``, which would run the code of a file that is not known to be weights: only the
    unpickler's own reason is kept."""
    text = str(error)
    if "weights_only" in text:
        _, found, after = text.partition("WeightsUnpickler error:")
        reason = next((line.strip() for line in after.splitlines() if line.strip()), "") if found else ""
        return f"not a PyTorch weights file ({reason})" if reason else "not a PyTorch weights file"
    return f"{type(error).__name__}: {first_line(error)}"


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, with a failure of the system (a full disk, a file-size limit) raised as
    the OSError it is, naming the file: safetensors reports it in its own type, which callers cannot tell from a
    bug and which loses the file's name."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:
        # ("(os error 21)" from safetensors 0.6.1, "IoError(Os { code: 21, ... })" before)
        code = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(e))
        if isinstance(e, OSError) or code is None:
            raise
        number = int(code.group(1) or code.group(2))
        if os.name == "nt":  # Rust's code there is the Windows one, from which Python finds the errno
            raise OSError(None, str(e), str(path), number) from None
        raise OSError(number, os.strerror(number), str(path)) from None
    if os.name == "posix":
        # safetensors writes through a private temporary file, so the result would be the writer's alone: a
        # converted model used by ComfyUI running as another user (a service, a container) could not be read.
        try:
            os.chmod(path, 0o666 & ~_umask())
        except OSError:  # a file system without modes (exFAT, a network share) refuses, and needs none
            pass


def _umask() -> int:
    try:  # Linux reports it without changing it (changing it, even back at once, races other threads)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o077)  # (for the moment it is in force, the stricter is the safe one)
        os.umask(mask)
        return mask


def summary(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def key_mismatches(expected: dict, state_dict: dict) -> list[str]:
    """Missing, unexpected and misshapen keys of ``state_dict`` against ``expected`` (name -> shape), as message
    parts; empty when they match."""
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k])})"
                   for k in expected.keys() & state_dict.keys() if tuple(state_dict[k].shape) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys: {summary(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys: {summary(unexpected)}")
    if wrong_shape:
        parts.append(f"wrong shapes: {summary(wrong_shape, 4)}")
    return parts


def load_into(module: nn.Module, state_dict: dict, what: str, source, device="cpu", dtype=None,
              tolerated_prefixes: tuple = (), hint: str = "") -> nn.Module:
    """Load ``state_dict`` strictly into ``module`` (usually built on the meta device) and return it on ``device``.

    Keys starting with ``tolerated_prefixes`` that the module lacks are logged and dropped; any other missing,
    unexpected or misshapen key raises WeightsError naming them, the file and ``hint``.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    leftovers = [k for k in state_dict if k not in expected and tolerated_prefixes and k.startswith(tolerated_prefixes)]
    if leftovers:
        log.info("%s: ignoring %d unused tensors from %s (%s)", what, len(leftovers), source, summary(leftovers, 3))
    state_dict = {k: v for k, v in state_dict.items() if k not in leftovers}
    problems = key_mismatches(expected, state_dict)
    if problems:
        parts = [f"{what} weights in {source} do not match the model"] + problems
        if hint:
            parts.append(hint)
        raise WeightsError("; ".join(parts))
    if dtype is not None:
        state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
    module = module.to(device).eval().requires_grad_(False)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left uninitialised after loading: {left}")
    return module


def safetensors_numel(path) -> int:
    """Number of elements stored in a .safetensors file, read from its header only (no tensor is loaded); a
    WeightsError for a file that is not one (``check_weights_file``)."""
    header = check_weights_file(path) or {}
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            n = 1
            for side in entry["shape"]:
                n *= side
            total += n
    return total
