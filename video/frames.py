"""Folders of frames: reading images at full precision and upright (8- and 16-bit PNGs, grey or colour, EXIF
orientation), writing PNG/16-bit PNG/npy, and the folder jobs of ``streamvsr frames`` and ``streamvsr flow`` (any engine of
``models/contract.py``; any flow function).

The same guarantees as for video files (``outputs``): the whole input folder is checked before any work
(``check_frames``, ``check_folder_outputs``: every file an undamaged image, one size, outputs that neither are nor
replace the inputs), each output file is written under a temporary name and renamed when complete, existing
outputs are replaced only with ``overwrite``, and a lock refuses a second run into the same folder. With
``resume``, a checkpoint next to the output folder lets a stopped ``frames`` job continue where it stopped.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..models.shared.errors import OutputExistsError, UserInputError
from .outputs import (TMP_TAG, OutputLock, check_folder_creatable, make_folder, publish, remove_stale, same_file,
                      temp_path)
from .resume import CheckpointClock, ResumeFiles, fingerprint_mismatch, folder_fingerprint, other_settings

log = logging.getLogger(__name__)

SAVE_FORMATS = ("png", "png16", "npy")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# FFmpeg's names of the 16-bit PNG layouts -> channels (all packed, big-endian, one plane).
_PNG16_LAYOUTS = {"gray16be": 1, "ya16be": 2, "rgb48be": 3, "rgba64be": 4}


def write_png16(path: Path, rgb: np.ndarray) -> None:
    """Write an H x W x 3 uint16 array as a 16-bit RGB PNG (PIL cannot write 16-bit RGB)."""
    h, w, _ = rgb.shape
    raw = np.ascontiguousarray(rgb.astype(">u2")).view(np.uint8).reshape(h, w * 6)
    rows = np.concatenate([np.zeros((h, 1), np.uint8), raw], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(PNG_SIGNATURE + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


def png_bit_depth(path: Path) -> int | None:
    """The bit depth in a PNG's header, or None for anything that is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24]


def _read_png16(path: Path) -> np.ndarray:
    """A 16-bit PNG as H x W x 3 float32 in [0, 1], all 16 bits kept. PIL reads 16-bit colour PNGs as 8-bit
    (it has no 16-bit RGB mode), so these are decoded with FFmpeg's PNG decoder (PyAV is a dependency anyway)."""
    import av

    with open(path, "rb") as f, av.open(f, format="png_pipe") as container:
        frame = next(container.decode(video=0))
    channels = _PNG16_LAYOUTS.get(frame.format.name)
    if channels is None:  # not expected from a 16-bit PNG; let swscale convert whatever it is
        arr = frame.to_ndarray(format="rgb48le")
    else:
        plane = frame.planes[0]
        raw = np.frombuffer(bytes(plane), dtype=">u2").reshape(frame.height, plane.line_size // 2)
        arr = raw[:, : frame.width * channels].reshape(frame.height, frame.width, channels)
        arr = np.repeat(arr[..., :1], 3, axis=2) if channels <= 2 else arr[..., :3]  # grey -> RGB, alpha dropped
    return arr.astype(np.float32) / 65535.0


def _image_errors():
    import av
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, zlib.error, struct.error, av.FFmpegError,
            Image.DecompressionBombError)


def _reason(e: BaseException) -> str:
    return (getattr(e, "strerror", None) or str(e) or type(e).__name__).rstrip(".")


# EXIF orientation (1-8) -> how the stored pixels are turned to be shown (as browsers and viewers do).
_EXIF_TURNS = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _png_has_exif(path: Path) -> bool:
    """Whether the PNG at ``path`` holds an EXIF chunk, from its list of chunks (their data skipped)."""
    with open(path, "rb") as f:
        f.seek(len(PNG_SIGNATURE))
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"eXIf", b"IEND"):
                return kind == b"eXIf"
            f.seek(length + 4, os.SEEK_CUR)  # the data and its checksum
    return False


def _orientation(img, path: Path | None = None) -> int:
    # To find EXIF after the pixel data, Pillow decodes the whole PNG: where the chunk list has none (most PNGs),
    # checking a folder of frames would decode every one of them
    if path is not None and img.format == "PNG" and "exif" not in img.info and not _png_has_exif(path):
        return 1
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block does not make the picture unreadable
        return 1


def read_frame(path: Path) -> torch.Tensor:
    """An image as a (3, h, w) float32 tensor in [0, 1], at full precision and as it is meant to be seen: 16-bit
    PNGs keep their 16 bits, an EXIF orientation is applied, grey is replicated to RGB, alpha is dropped (like
    the official preprocessing). A file that is not a readable image is a one-line error."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as img:
            orientation = _orientation(img)
            if png_bit_depth(path) == 16:
                arr = _read_png16(path)
            elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float32) / 65535.0
                arr = np.repeat(arr[..., None], 3, axis=2)
            else:
                arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        if orientation in _EXIF_TURNS:
            arr = _EXIF_TURNS[orientation](arr)
    except _image_errors() as e:
        raise UserInputError(f"{path} cannot be read as an image ({_reason(e)})") from None
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def _write(hr: torch.Tensor, path: Path, fmt: str) -> None:
    from PIL import Image

    arr = hr[0].permute(1, 2, 0).to("cpu").float().numpy()
    if fmt == "npy":
        np.save(path, arr.astype(np.float32))
    elif fmt == "png16":
        write_png16(path, np.round(arr * 65535).astype(np.uint16))
    else:
        Image.fromarray(np.round(arr * 255).astype(np.uint8)).save(path)


class _Landing:
    """The output being put in place, for a stop that comes meanwhile: once moved there it is written, whether or
    not the count after it was reached (the move is the last step that changes the folder). Told by the file's
    identity: another program's file that took the name meanwhile is not this run's output."""

    def __init__(self):
        self.index, self.path, self.made = -1, None, None

    @staticmethod
    def _identity(path: Path):
        try:
            found = os.stat(path)
        except OSError:
            return None
        return found.st_dev, found.st_ino

    def start(self, index: int, path: Path) -> None:
        self.index, self.path, self.made = index, path, None

    def made_as(self, tmp: Path) -> None:
        """The finished output, about to be moved to its name (a hard link or rename keeps its identity)."""
        self.made = self._identity(tmp)

    def landed(self, count: int) -> bool:
        """Whether output number ``count`` (the one after those counted) was being put in place and is there."""
        return count == self.index and self.made is not None and self._identity(self.path) == self.made


def output_name(stem: str, fmt: str) -> str:
    # Appended, not Path.with_suffix: a stem such as "shot.0001" must not lose its ".0001".
    return stem + (".npy" if fmt == "npy" else ".png")


def save_frame(hr: torch.Tensor, path_stem: Path, fmt: str, overwrite: bool = True,
               landing: _Landing | None = None) -> Path:
    """Save a (1, 3, H, W) [0, 1] tensor as png (8-bit, rounded like the official), png16 or npy, at
    ``path_stem`` + the format's extension. Written to a temporary name and renamed once complete (``landing``
    is told the finished file)."""
    path_stem = Path(path_stem)
    path = path_stem.with_name(output_name(path_stem.name, fmt))
    tmp = temp_path(path)
    try:
        _write(hr, tmp, fmt)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # (PIL's write errors name no file: a full disk is then told without a place)
        raise
    if landing is not None:
        landing.made_as(tmp)
    return publish(tmp, path, overwrite=overwrite, keep_stopped=False)


def frame_order(path: Path) -> tuple:
    """Sort key: names in natural order, numbers by value (frame_2 before frame_10, where a plain sort puts
    frame_10 first and a sequence numbered without leading zeros would be upscaled out of order). Zero-padded
    names keep their plain order; the name itself breaks ties (01 and 1)."""
    # re.split with a group alternates text (even places, maybe empty) and digits (odd places): like types meet
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", path.name))], path.name


# Other image files a sequence may sit beside: said when left out, since the frame count would silently shrink
_OTHER_IMAGES = {".jpg", ".jpeg", ".jfif", ".tif", ".tiff", ".bmp", ".webp", ".exr", ".dpx", ".cin", ".tga", ".gif",
                 ".apng", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".ppm", ".pgm", ".pnm", ".psd", ".hdr",
                 ".qoi", ".dds"}


def list_pngs(in_dir: Path) -> list[Path]:
    """The PNG frames of ``in_dir`` in natural name order (``frame_order``). Hidden files (a Mac's ``._`` copies
    of each file on a foreign drive) and this pack's work files are left out, the latter and other image files
    with a warning; a link to a file that is gone is kept, for ``check_frames`` to report (left out, it would join
    the frames on either side of the gap)."""
    in_dir = Path(in_dir)
    if not in_dir.exists():
        raise UserInputError(f"{in_dir} does not exist")
    if not in_dir.is_dir():
        raise UserInputError(f"{in_dir} is not a folder")
    files, work, others = [], [], {}
    try:
        for p in in_dir.iterdir():
            if p.name.startswith("."):
                continue
            suffix = p.suffix.lower()
            if suffix != ".png":
                if suffix in _OTHER_IMAGES:
                    others[suffix] = others.get(suffix, 0) + 1
            elif TMP_TAG in p.name:
                work.append(p.name)
            elif p.is_file() or p.is_symlink():
                files.append(p)
    except OSError as e:
        raise UserInputError(f"cannot list {in_dir}: {_reason(e)}") from None
    if not files:
        raise UserInputError(f"no .png files in {in_dir}" + (
            f" (it holds {_counts(others)}: convert them to PNG)" if others else ""))
    if work:
        log.warning("left out %s: the work file%s of a run that did not finish", ", ".join(sorted(work)),
                    "s" if len(work) > 1 else "")
    if others:
        log.warning("%s also holds %s: only the .png files are frames", in_dir, _counts(others))
    return sorted(files, key=frame_order)


def _counts(by_suffix: dict) -> str:
    return ", ".join(f"{n} {suffix} file{'s' if n > 1 else ''}" for suffix, n in sorted(by_suffix.items()))


def check_frames(files: list[Path], alpha_note: str = "only its colours are upscaled, and the outputs have none"
                 ) -> tuple[int, int]:
    """Check, before any work, that every file is an undamaged image and that all have one size; returns that
    (width, height). Only headers are parsed and chunk checksums verified (no pixels decoded), so this costs a
    read of the files, not a decode. ``alpha_note``: what the job does with a frame's transparency, said once."""
    from PIL import Image

    size, first, alpha = None, None, None
    for path in files:
        try:
            if not path.exists():
                raise FileNotFoundError(2, "a link to a file that is gone" if path.is_symlink() else "it is gone")
            if not os.access(path, os.R_OK):
                raise PermissionError(13, "permission denied")
            with Image.open(path) as img:
                img.verify()  # must come first on a freshly opened image
            with Image.open(path) as img:
                this = img.size[::-1] if _orientation(img, path) in (5, 6, 7, 8) else img.size  # 5-8 swap sides
                if getattr(img, "n_frames", 1) > 1:
                    raise ValueError(f"it is animated, {img.n_frames} pictures in one file: give each as a file")
                if alpha is None and ("A" in img.mode or "transparency" in img.info):
                    alpha = path
        except _image_errors() as e:
            raise UserInputError(f"{path} is not a readable image ({_reason(e)}); fix or remove it") from None
        if size is None:
            size, first = this, path
        elif this != size:
            raise UserInputError(f"all frames of a sequence must have one size: {first.name} is "
                                 f"{size[0]}x{size[1]}, {path.name} is {this[0]}x{this[1]}")
    if alpha is not None:
        log.warning("%s has transparency: %s", alpha.name, alpha_note)
    return size


def check_folder_outputs(in_dirs, out_dir: Path, inputs: list[Path], names: list[str],
                         overwrite: bool = False) -> None:
    """The output folder is not an input folder (by identity, so links count), can be created, and the files
    ``names`` to be written there neither are input files nor exist already (unless ``overwrite``)."""
    out_dir = Path(out_dir)
    for in_dir in in_dirs:
        if same_file(in_dir, out_dir):
            how = "" if os.path.abspath(in_dir) == os.path.abspath(out_dir) else " (through a link)"
            raise UserInputError(f"the output folder {out_dir} is the input folder {in_dir}{how}: the outputs would "
                                 "replace or mix with the input frames; choose another output folder")
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise UserInputError(f"the output folder {out_dir} is a file")
    check_folder_creatable(out_dir)
    seen = {}
    for name, source in zip(names, inputs):
        if name in seen:
            raise UserInputError(f"{seen[name].name} and {source.name} would both be written as {name}; rename one")
        seen[name] = source
    if not out_dir.is_dir():
        return
    ids = {}
    for path in inputs:
        try:
            st = path.stat()
            ids[(st.st_dev, st.st_ino)] = path
        except OSError:
            pass
    existing = []
    for name in names:
        target = out_dir / name
        if not os.path.lexists(target):
            continue
        try:
            st = target.stat()
            match = ids.get((st.st_dev, st.st_ino))
        except OSError:
            match = None
        if match is not None:
            raise UserInputError(f"the output {target} is the input frame {match} (the same file through a link); "
                                 "choose another output folder")
        if target.is_dir():  # (it would be found only when the output computed for it is put in place)
            raise UserInputError(f"{target} is a folder, where an output file of that name is to go: move it away "
                                 "or choose another output folder")
        existing.append(target)
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more of this run's outputs" if len(existing) > 1 else ""
        raise OutputExistsError(f"{out_dir} already has {existing[0].name}{more}; add --overwrite to replace them")


def _prepare(out_dir: Path, names: list[str]) -> None:
    """Under the folder's lock: create it, and clear the temporary files of this run's outputs ``names`` that a run
    which did not finish left. Only those: the lock is the folder's, and a video being upscaled into the same
    folder holds its own lock, not this one."""
    make_folder(out_dir)
    remove_stale([temp_path(out_dir / name) for name in names])


@dataclass
class FolderJob:
    """A checked ``frames`` job (``check_folder_job``): what can be known before the model is loaded."""

    names: list[str]             # the output files, one per input frame
    files: ResumeFiles | None    # the checkpoint's files (with resume)
    saved: dict | None           # the checkpoint to continue, if any (with resume)
    discard_unfinished: bool     # an unfinished resumable job of this folder is to be thrown away (overwrite)
    redone: frozenset = frozenset()  # outputs a continued job wrote after its checkpoint's point: replaced


def folder_checkpoint(out_dir) -> ResumeFiles:
    """The checkpoint files of a ``frames`` job into ``out_dir``: next to the folder, named after it (an output
    folder named "." or ".." has its real name; one at a file system's root keeps them inside it)."""
    folder = Path(os.path.abspath(out_dir))
    return ResumeFiles(folder if folder.name else folder / "streamvsr-frames")


def check_folder_job(files: list[Path], out_dir: Path, seed: int = 42, save: str = "png", resume: bool = False,
                     overwrite: bool = False) -> FolderJob:
    """Every check of a ``frames`` job that needs no model, each failure a one-line error: the format, the outputs
    (``check_folder_outputs``) and an unfinished resumable job of ``out_dir`` (its checkpoint
    ``OUT_DIR.streamvsr-resume.safetensors`` next to the folder): continued with ``resume`` where its settings and
    the frames it read are this job's, and where the outputs it finished are there; discarded with ``overwrite``;
    else an error. Nothing is written."""
    if save not in SAVE_FORMATS:
        raise UserInputError(f"save must be one of {', '.join(SAVE_FORMATS)}, got {save!r}")
    out_dir, files = Path(out_dir), [Path(p) for p in files]
    names = [output_name(p.stem, save) for p in files]
    checkpoint = folder_checkpoint(out_dir)
    saved, damaged = checkpoint.read_info_or_discard(overwrite)
    if saved is not None or damaged:
        with OutputLock(out_dir):  # a run writing this job right now is what to report, not its checkpoint
            pass
    if saved is not None and not resume and not overwrite:
        raise UserInputError(f"{out_dir} has an unfinished resumable job ({saved['frames']} frames done, "
                             f"{checkpoint.state.name} next to it): add --resume to continue it, or --overwrite to "
                             "discard it")
    discard = damaged or (saved is not None and not resume)
    if saved is not None and resume:
        read = files[:saved["consumed"]]
        base = folder_fingerprint(files[0].parent, [p.name for p in read], [_stamp(p) for p in read], seed, save,
                                  (0, 0))
        del base["size"]  # (that of the frames it read, which are compared)
        if len(read) < saved["consumed"]:
            base["frames_read"]["count"] = saved["consumed"]  # (fewer frames now: never equal)
        discard = other_settings(checkpoint, fingerprint_mismatch(saved["fingerprint"], base), overwrite)
        gone = [name for name in names[:saved["frames"]] if not os.path.lexists(out_dir / name)]
        if gone and not discard:
            if not overwrite:
                raise UserInputError(f"{checkpoint.state} counts {saved['frames']} finished frames, but "
                                     f"{out_dir / gone[0]}{f' and {len(gone) - 1} more' if len(gone) > 1 else ''} "
                                     "are gone; put them back to continue, or add --overwrite to discard the job and "
                                     "start over")
            discard = True
    continued = saved is not None and resume and not discard
    try:
        check_folder_outputs({p.parent for p in files}, out_dir, files, names, overwrite or continued)
    except OutputExistsError as e:
        if not resume or saved is not None:
            raise
        # (e.g. a run killed before its first checkpoint: its outputs are there, a job to continue is not)
        raise OutputExistsError(f"{e}; --resume finds no resume file of a job ({checkpoint.state.name}) to "
                                "continue") from None
    redone = frozenset(saved.get("after", ())) if continued else frozenset()
    if continued and not overwrite:
        # Past the frames it counts, a continued job replaces only the outputs its checkpoint says it wrote (at
        # a stop mid-way through a burst of frames): any other is not known to be its own (one it wrote after
        # its last checkpoint before it was killed, or a file put there since)
        others = [name for name in names[saved["frames"]:] if name not in redone
                  and os.path.lexists(out_dir / name)]
        if others:
            more = f" and {len(others) - 1} more" if len(others) > 1 else ""
            raise OutputExistsError(f"{out_dir} already has {others[0]}{more} of the frames after the "
                                    f"{saved['frames']} that {checkpoint.state.name} counts: written by this job "
                                    "after its last checkpoint before it was killed, or another's; add --overwrite "
                                    "to let it replace them")
    return FolderJob(names, checkpoint if resume else None, saved if continued else None, discard, redone)


def _stamp(path: Path) -> str:
    """What tells a frame file from another under its name: its size and modification time."""
    try:
        st = path.stat()
    except OSError:  # (a frame that cannot be read stops the job when it comes)
        return "?"
    return f"{st.st_size}:{st.st_mtime_ns}"


def upscale_folder(engine, files: list[Path], out_dir: Path, seed: int = 42, save: str = "png",
                   progress: Callable[[int], None] | None = None, overwrite: bool = False, resume: bool = False,
                   checkpoint_seconds: float | None = None, checkpoint_frames: int | None = None,
                   should_stop: Callable[[], bool | None] | None = None) -> int:
    """Upscale ``files`` (one sequence, in order) into ``out_dir``, one output per input with the same stem.
    Frames are written as the engine finishes them, each complete or not at all. Returns the number written
    (fewer than ``files`` only after a stop that ``should_stop`` asked for).

    should_stop(): polled before each frame is read; True stops the run there, as a stop at once would but
    without losing a frame in progress: the frames the engine holds back are not finished (with ``resume`` they
    stay in the checkpoint), and a warning says what was written. Not polled once the last frame is read.

    A frame that cannot be read, or has another size, stops the run: the frames before it are finished and the
    error says how many were written.

    resume: keep a checkpoint (the engine state after the frames read so far) next to ``out_dir``, every
    ``checkpoint_seconds`` (or ``checkpoint_frames`` frames; neither: ``CheckpointClock``'s default) and when the
    run stops for any reason, and continue from it (see ``check_folder_job``); removed once every frame is
    written. Since a state is never changed by later steps, a hard stop mid-frame still checkpoints the frames
    before it."""
    out_dir = Path(out_dir)
    files = [Path(p) for p in files]
    job = check_folder_job(files, out_dir, seed, save, resume, overwrite)
    names, checkpoint = job.names, job.files
    make_folder(out_dir.parent)
    with OutputLock(out_dir):
        _prepare(out_dir, names)
        work_files = checkpoint or folder_checkpoint(out_dir)
        if job.discard_unfinished:
            work_files.remove()
            log.info("discarded the unfinished resumable job of %s (overwrite)", out_dir)
        # (a checkpoint being written when a run was stopped a second time)
        remove_stale([work_files.state_tmp])
        state, consumed, written, stamps = engine.new_state(seed), 0, 0, []
        saved = None
        if checkpoint is not None and job.saved is not None:
            saved = checkpoint.load_or_discard(engine, overwrite)
        size = None
        if saved is not None:
            info, state, _ = saved
            consumed, written = info["consumed"], info["frames"]
            size = tuple(info["fingerprint"]["size"])[::-1]
            stamps = [_stamp(p) for p in files[:consumed]]
            # (the model's part of the settings can only be compared now)
            differs = fingerprint_mismatch(info["fingerprint"], {"model": engine.identity()})
            if other_settings(checkpoint, differs, overwrite):
                checkpoint.remove()
                log.info("discarded the unfinished resumable job of %s (%s; overwrite)", out_dir, differs)
                state, consumed, written, stamps, size, saved = engine.new_state(seed), 0, 0, [], None, None
            else:
                log.info("resuming %s after %d frames", out_dir, written)
        replaceable = job.redone if saved is not None else frozenset()
        # the outputs that a stop would leave from an earlier run (see done); those a continued job wrote past its
        # checkpoint are its own
        earlier = {name for name in names[written:] if name not in replaceable and (out_dir / name).exists()}
        stems: deque[str] = deque(p.stem for p in files[written:consumed])  # pushed, not yet returned
        # the last point where the state, the frames read and the outputs written agree: what a checkpoint saves
        safe = (state, consumed, written)
        saved_at = (consumed, written, len(job.redone)) if saved is not None else (0, 0, 0)
        clock, warned = CheckpointClock(checkpoint_seconds, checkpoint_frames), False
        if progress is not None and written:
            progress(written)

        def save_checkpoint() -> None:
            nonlocal saved_at
            ckpt_state, ckpt_consumed, ckpt_written = safe
            # the outputs written past that point (a stop mid-way through a burst of frames, or the frames held
            # back, finished when a frame could not be read), by this run or by the one it continues and not yet
            # written again: the next run redoes them, replacing them
            after = [name for i, name in enumerate(names[ckpt_written:], ckpt_written)
                     if i < written or (name in replaceable and os.path.lexists(out_dir / name))]
            if checkpoint is None or (ckpt_consumed, ckpt_written, len(after)) == saved_at:
                return
            fp = folder_fingerprint(files[0].parent, [p.name for p in files[:ckpt_consumed]], stamps[:ckpt_consumed],
                                    seed, save, (size[1], size[0]), engine)
            started = time.monotonic()
            checkpoint.save(ckpt_state, {"fingerprint": fp, "consumed": ckpt_consumed, "frames": ckpt_written,
                                         "after": after, "segments": 0, "held_pts": [], "complete": False,
                                         "scene_cuts": 0}, None)
            clock.save_took = time.monotonic() - started
            saved_at = (ckpt_consumed, ckpt_written, len(after))

        def try_checkpoint(stopping: bool) -> None:
            # Where a checkpoint cannot be saved (a full disk, a folder without write permission), the reason the
            # run stops is the error to report, and a run that goes on is not stopped by it: a warning says what
            # a stop would lose.
            nonlocal warned
            try:
                save_checkpoint()
            except Exception as e:  # noqa: BLE001
                if stopping or not warned:
                    fallback = ("the next run continues from the one before" if saved_at[0] else
                                "there is none yet, so the next run starts over")
                    log.warning("could not save the resume checkpoint %s (%s: %s)%s; %s", checkpoint.state,
                                type(e).__name__, e, "" if stopping else ", going on", fallback)
                    warned = True

        def done(how: str = "") -> str:
            mixed = _still_earlier(names, written, earlier)
            again = "; run the same command again to continue" if checkpoint is not None and saved_at[0] else ""
            return (f"{written} of {len(files)} frames were written to {out_dir}{how}" if written else
                    f"no frame was written to {out_dir}") + mixed + again

        landing = _Landing()

        def emit(frames: torch.Tensor) -> None:
            nonlocal written
            for hr in frames:
                stem = stems.popleft()
                landing.start(written, out_dir / output_name(stem, save))
                save_frame(hr[None], out_dir / stem, save,
                           overwrite=overwrite or output_name(stem, save) in replaceable, landing=landing)
                written += 1
                if progress is not None:
                    progress(written)

        stopped = False
        try:
            for path in files[consumed:]:
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                try:
                    frame = read_frame(path)
                    if size is not None and tuple(frame.shape[-2:]) != size:
                        raise UserInputError(f"{path.name} is {frame.shape[-1]}x{frame.shape[-2]}, the frames "
                                             f"before it {size[1]}x{size[0]}: all frames of a sequence must have "
                                             "one size")
                except UserInputError as e:
                    # The frames before this one are good: keep where they stand, finish those the engine still
                    # holds, then report.
                    try_checkpoint(True)
                    out, state = engine.flush(state)
                    emit(out)
                    try_checkpoint(True)  # (the outputs just finished are redone by the next run)
                    raise UserInputError(f"{e}; {done()}") from None
                size = tuple(frame.shape[-2:])
                stems.append(path.stem)
                stamps.append(_stamp(path))
                out, state = engine.push(state, frame[None])
                consumed += 1
                emit(out)
                safe = (state, consumed, written)
                if clock.frame_done() and checkpoint is not None:
                    try_checkpoint(False)
                    clock.restart()
            if stopped:
                try_checkpoint(True)
                log.warning("stopped: %s", done(", each complete"))
                return written
            out, state = engine.flush(state)
            emit(out)
        except KeyboardInterrupt:  # (Ctrl-C: the command line says only that it was interrupted)
            written += landing.landed(written)  # (past the checkpoint's point: the next run redoes it)
            try_checkpoint(True)
            log.warning("stopped: %s", done(", each complete"))
            raise
        except BaseException as e:
            written += landing.landed(written)
            try_checkpoint(True)
            if isinstance(e, OSError):  # a full disk, a drive gone: what is kept, as after a stop
                log.warning("%s", done(" before this error, each complete"))
            raise
        if checkpoint is not None:
            try:
                checkpoint.remove()
            except KeyboardInterrupt:  # the job is finished: its checkpoint, which would say otherwise, goes
                checkpoint.remove()
                log.warning("the stop came after the last frame: %s written to %s",
                            "it was" if written == 1 else f"all {written} were", out_dir)
                raise
    return written


def _span(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} to {names[-1]}"


def _still_earlier(names: list[str], written: int, earlier: set) -> str:
    """A run that stops replaced only the outputs it wrote (the first ``written`` of ``names``): where the others
    are outputs of an earlier run (``earlier``), the folder mixes two runs, said in a clause to add."""
    kept = [name for name in names[written:] if name in earlier]
    where = "after them" if written else "there"
    return f"; {len(kept)} {where} ({_span(kept)}) are still those of an earlier run" if kept else ""


def flow_folder(estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], files: list[Path], out_dir: Path,
                save: str = "npy", overwrite: bool = False, progress: Callable[[int], None] | None = None,
                max_magnitude: float | None = None, should_stop: Callable[[], bool | None] | None = None) -> int:
    """For each consecutive pair of ``files``, write the flow that backward-warps frame i-1 onto frame i, i.e.
    ``estimator(image1=frame i, image2=frame i-1)``, at input resolution, named after frame i: ``npy`` = float32
    H x W x 2 (x then y, in pixels), ``png`` = colour-wheel picture (``max_magnitude``: the speed drawn fully
    saturated in every picture; None: each picture's largest). Returns the number of flows written;
    ``progress(count)`` after each; ``should_stop()``, polled before each frame is read, stops the run there when
    True (a warning says what was written).
    One frame gives no flow: that is an error, not an empty success."""
    from ..models.raft.visualise import flow_to_image

    if save not in ("npy", "png"):
        raise UserInputError(f"save must be 'npy' or 'png', got {save!r}")
    files = [Path(p) for p in files]
    if len(files) < 2:
        raise UserInputError(f"optical flow needs at least two frames; {files[0].parent if files else 'the input'} "
                             f"has {len(files)} ({', '.join(p.name for p in files) or 'none'}), so there is no flow "
                             "to write")
    out_dir = Path(out_dir)
    names = [output_name(p.stem, save) for p in files[1:]]
    check_folder_outputs({p.parent for p in files}, out_dir, files[1:], names, overwrite)
    make_folder(out_dir.parent)
    previous = None
    count = 0
    with OutputLock(out_dir):
        _prepare(out_dir, names)
        earlier = {name for name in names if (out_dir / name).exists()}  # (see _still_earlier)
        landing = _Landing()

        def stopped(error: bool = False) -> None:
            log.warning("%s%d of %d flow fields were written to %s%s, each complete%s", "" if error else "stopped: ",
                        count, len(files) - 1, out_dir, " before this error" if error else "",
                        _still_earlier(names, count, earlier))

        try:
            for path in files:
                if should_stop is not None and should_stop():
                    stopped()
                    return count
                try:
                    current = read_frame(path)[None] * 2 - 1
                    if previous is not None and previous.shape != current.shape:
                        raise UserInputError(f"{path.name} is {tuple(current.shape[-2:])}, the previous frame "
                                             f"{tuple(previous.shape[-2:])}: all frames must have the same size")
                except UserInputError as e:
                    raise UserInputError(f"{e}; {count} of {len(files) - 1} flow fields were written to "
                                         f"{out_dir}{_still_earlier(names, count, earlier)}") from None
                if previous is not None:
                    flow = estimator(current, previous)[0].permute(1, 2, 0).cpu().numpy().astype(np.float32)
                    target = out_dir / output_name(path.stem, save)
                    tmp = temp_path(target)
                    try:
                        if save == "npy":
                            np.save(tmp, flow)
                        else:
                            from PIL import Image

                            Image.fromarray(flow_to_image(flow, max_magnitude)).save(tmp)
                    except BaseException:
                        tmp.unlink(missing_ok=True)
                        raise
                    landing.start(count, target)
                    landing.made_as(tmp)
                    publish(tmp, target, overwrite=overwrite, keep_stopped=False)
                    count += 1
                    log.debug("flow %s", path.name)
                    if progress is not None:
                        progress(count)
                previous = current
        except KeyboardInterrupt:  # (as upscale_folder: the command line says only that it was interrupted)
            count += landing.landed(count)
            stopped()
            raise
        except OSError:  # a full disk, a drive gone: what is kept, as after a stop
            count += landing.landed(count)
            stopped(error=True)
            raise
    return count
