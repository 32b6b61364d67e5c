"""The work files of a resumable job: video segments, the engine state checkpoint, and joining the segments."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import torch

from .audio import AudioCopy

# Bumped whenever the checkpoint's content changes meaning: an old checkpoint is then refused, not misread.
RESUME_VERSION = 2


class ResumeFiles:
    """The work files of a resumable job writing ``out_path``."""

    def __init__(self, out_path):
        self.out = Path(out_path)
        self.state = self.out.with_name(self.out.name + ".streamvsr-resume.safetensors")

    def part(self, index: int) -> Path:
        # NUT keeps every timestamp exactly in the input's time base (MP4 would round a segment's start to the
        # millisecond through its edit list) and carries any codec.
        return self.out.with_name(f"{self.out.name}.streamvsr-part{index:04d}.nut")

    def parts_on_disk(self) -> list[Path]:
        prefix = self.out.name + ".streamvsr-part"
        return sorted(p for p in self.out.parent.glob(f"{glob_escape(prefix)}*") if p.name.startswith(prefix))

    def load(self, engine):
        """``(info, engine state, scene thumbnail or None)`` of the last checkpoint, or None when there is none."""
        from safetensors import safe_open

        if not self.state.exists():
            return None
        with safe_open(str(self.state), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(meta["streamvsr_resume"])
        state = engine.state_from_dict({k: v for k, v in tensors.items() if k != "scene_thumbnail"}, meta)
        return info, state, tensors.get("scene_thumbnail")

    def save(self, state, info: dict, thumbnail: torch.Tensor | None) -> None:
        from safetensors.torch import save_file

        tensors, meta = state.to("cpu").to_dict()
        if thumbnail is not None:
            tensors["scene_thumbnail"] = thumbnail.contiguous()
        meta = {**meta, "streamvsr_resume": json.dumps(info)}
        tmp = self.state.with_name(self.state.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self.state)  # atomic: a crash leaves the previous checkpoint intact

    def remove(self) -> None:
        for p in self.parts_on_disk():
            p.unlink(missing_ok=True)
        self.state.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def fingerprint(source, engine, seed, codec, crf, scene_cut_threshold, size: tuple[int, int]) -> dict:
    """Everything that must be equal for a checkpoint to continue a job: the input, the engine's identity (model,
    precision, options) and the output settings."""
    if isinstance(source, (str, os.PathLike)):
        src = {"input": os.path.abspath(source), "input_bytes": os.path.getsize(source)}
    else:
        src = {"input": None, "input_bytes": None}
    return {**src, "size": list(size), "seed": int(seed), "codec": codec, "crf": crf,
            "scene_cut": scene_cut_threshold, "model": engine.identity(), "version": RESUME_VERSION}


def join_segments(parts: list[Path], out_path: Path, audio_from=None, time_base: Fraction | None = None) -> int:
    """Remux video-only segments into one file (no re-encoding) and add the audio of ``audio_from``."""
    import av

    frames = 0
    with av.open(str(parts[0])) as first:
        template = first.streams.video[0]
        sink = av.open(str(out_path), "w")
        try:
            v_out = sink.add_stream_from_template(template)
            if time_base is not None:
                v_out.time_base = time_base
            audio = AudioCopy(audio_from, sink, out_path.suffix) if audio_from is not None else None
            for part in parts:
                with av.open(str(part)) as seg:
                    for packet in seg.demux(seg.streams.video[0]):
                        if packet.dts is None:
                            continue
                        if audio is not None:
                            audio.mux_until(float(packet.pts * packet.time_base))
                        packet.stream = v_out
                        sink.mux(packet)
                        frames += 1
            if audio is not None:
                audio.finish(None)
        finally:
            sink.close()
    return frames
