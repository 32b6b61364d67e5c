"""FlashVSR's frame and size arithmetic, and the conditioning video (LR frames bicubic-upscaled to the output size).

Frames. The network works on a stream of F = 8k + 1 LR frames (k >= 3) and emits F - 4 output frames: the DiT
looks 4 LR frames past the last frame it finishes. The official scripts pad 4 copies of the last frame and then
cut the stream down to 8k + 1, losing up to 7 trailing frames. Here the input of n frames is first padded with
copies of its last frame to N' = the smallest 8m + 5 >= max(n, 21), then by 4 more, so F = N' + 4 and every input
frame gets an output (output frame j is aligned with LR frame j; frames past n are dropped). The stream is cut
into P = (F - 1)/8 - 2 chunks: chunk 0 makes 6 latent frames = output frames 0..20, every later chunk 2 latent
frames = 8 output frames (``Chunk`` gives the exact ranges).

Sizes. The output is exactly ``scale`` times the input. The network needs sides that are multiples of 128, so the
upscaled conditioning frame is padded at the bottom and right by repeating its last row / column (replicate) up
to the next multiple, and the output is cropped back to the top-left. (The official script instead crops the
upscaled frame down to a multiple of 128, centred, and returns that smaller video.) With sides that are already
multiples of 128 the two agree exactly.

Conditioning. The official reads 8-bit frames from files, upscales them with PIL's bicubic filter (PIL's a = -0.5
kernel, not torch's a = -0.75) and maps the uint8 result v to v / 255 * 2 - 1 in float32. Here float frames in
[0, 1] are first brought back to 8 bits as round(clamp(x, 0, 1) * 255) (round half to even): frames that came from
8-bit images or video (x = v / 255, as ComfyUI's loaders produce) give back exactly v, others the nearest level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MIN_OUTPUT = 21  # chunk 0 emits 21 frames; shorter inputs are padded up to it
LOOKAHEAD = 4  # LR frames the last output frame of a chunk waits for
FIRST_CHUNK_FRAMES = 21
CHUNK_FRAMES = 8
FIRST_CHUNK_LATENTS = 6
CHUNK_LATENTS = 2
SIZE_MULTIPLE = 128


def padded_count(n: int) -> int:
    """N': the smallest 8m + 5 >= max(n, 21); the stream's output count before dropping the padding."""
    if n < 1:
        raise ValueError(f"need at least one frame, got {n}")
    n = max(n, MIN_OUTPUT)
    return n + (5 - n) % 8


def stream_length(n: int) -> int:
    """F = N' + 4 = 8k + 1: LR frames in the padded stream of an ``n``-frame input."""
    return padded_count(n) + LOOKAHEAD


def official_stream_length(n: int) -> int:
    """The official scripts' F: the largest 8k + 1 <= n + 4 (they output F - 4 <= n frames; < 25 means none)."""
    return (n + LOOKAHEAD - 1) // 8 * 8 + 1


def num_chunks(stream_frames: int) -> int:
    """P = (F - 1)/8 - 2 chunks for a stream of F = 8k + 1 frames."""
    if stream_frames < 25 or (stream_frames - 1) % 8:
        raise ValueError(f"a FlashVSR stream has 8k + 1 >= 25 frames, got {stream_frames}")
    return (stream_frames - 1) // 8 - 2


def source_frame(j: int, n: int) -> int:
    """The input frame that padded-stream frame ``j`` is (padding repeats the last input frame)."""
    return min(j, n - 1)


@dataclass(frozen=True)
class Chunk:
    """One DiT pass. Ranges are [start, end) in padded-stream frames (or latent frames).

    lq: LR frames the LQ projection consumes (chunk 0: frame 0 to prime, then 6 clips of 4).
    latents: latent frames made, which is also the noise slice and the temporal RoPE positions.
    output: output frames decoded; the TC decoder's conditioning and the colour-fix reference are these LR frames.
    """

    index: int
    lq: tuple[int, int]
    latents: tuple[int, int]
    output: tuple[int, int]

    @property
    def needs(self) -> int:
        """LR frames that must exist before this chunk can run (= ``lq[1]``)."""
        return self.lq[1]


def chunk(i: int) -> Chunk:
    if i < 0:
        raise ValueError(f"chunk index must be >= 0, got {i}")
    if i == 0:
        return Chunk(0, (0, 25), (0, FIRST_CHUNK_LATENTS), (0, FIRST_CHUNK_FRAMES))
    return Chunk(i, (8 * i + 17, 8 * i + 25), (4 + 2 * i, 6 + 2 * i), (8 * i + 13, 8 * i + 21))


def plan(n: int) -> list[Chunk]:
    """Every chunk of the stream for an ``n``-frame input; together their outputs cover frames 0..N'-1."""
    return [chunk(i) for i in range(num_chunks(stream_length(n)))]


def chunks_ready(available: int) -> int:
    """How many chunks can run with the first ``available`` LR frames, before the input's end is known.

    Each of them belongs to the final plan whatever the final length turns out to be."""
    return 0 if available < 25 else (available - 25) // 8 + 1


def output_size(h: int, w: int, scale) -> tuple[int, int]:
    """(H0, W0): the output size, ``scale`` times the input (rounded as the official for a fractional scale)."""
    return int(round(h * scale)), int(round(w * scale))


def padded_size(height: int, width: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """The size the network runs at: each side rounded up to a multiple of ``multiple``."""
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def pad_to(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Replicate-pad (..., h, w) at the bottom and right up to (height, width)."""
    h, w = frames.shape[-2:]
    if (h, w) == (height, width):
        return frames
    if h > height or w > width:
        raise ValueError(f"cannot pad {h}x{w} to the smaller {height}x{width}")
    lead = frames.shape[:-2]
    x = frames.reshape(-1, 1, h, w)
    # replicate padding is not implemented for every integer dtype, and the pad is a copy anyway
    x = F.pad(x.float() if not x.is_floating_point() else x, (0, width - w, 0, height - h), mode="replicate")
    return x.to(frames.dtype).reshape(*lead, height, width)


def crop_to(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The top-left (height, width) of (..., H, W): undoes ``pad_to``."""
    return frames[..., :height, :width]


def quantize_8bit(frames: torch.Tensor) -> torch.Tensor:
    """Float frames in [0, 1] -> uint8 as round(clamp(x, 0, 1) * 255), exact for frames read from 8-bit files."""
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)


def upscale_frame(frame_uint8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One (h, w, 3) uint8 frame resized to ``size`` = (H, W) with PIL's bicubic filter, as the official does."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(frame_uint8))  # (h, w, 3) uint8 is RGB
    return np.asarray(image.resize((size[1], size[0]), Image.BICUBIC), dtype=np.uint8)


def condition_video(frames: torch.Tensor, scale, dtype=torch.float32, multiple: int = SIZE_MULTIPLE,
                    channels_last: bool = False) -> torch.Tensor:
    """The conditioning video of LR frames: (1, 3, n, H, W) in [-1, 1], ``dtype``, on the CPU.

    ``frames``: (n, 3, h, w) float in [0, 1], or (n, h, w, 3) with ``channels_last`` (ComfyUI's IMAGE). Each frame
    is quantised to 8 bits, PIL-bicubic-upscaled to ``output_size(h, w, scale)``, mapped as v / 255 * 2 - 1 in
    float32 (the official order), replicate-padded to ``padded_size`` and cast to ``dtype``.
    """
    if frames.ndim != 4 or frames.shape[-1 if channels_last else 1] != 3:
        layout = "(n, h, w, 3)" if channels_last else "(n, 3, h, w)"
        raise ValueError(f"frames must be {layout}, got {tuple(frames.shape)}")
    pixels = quantize_8bit(frames.detach().cpu())
    if not channels_last:
        pixels = pixels.permute(0, 2, 3, 1)
    pixels = pixels.numpy()
    height, width = output_size(pixels.shape[1], pixels.shape[2], scale)
    if height < 1 or width < 1:
        raise ValueError(f"scale {scale} makes {pixels.shape[1]}x{pixels.shape[2]} frames empty")
    up = np.stack([upscale_frame(p, (height, width)) for p in pixels])
    video = torch.from_numpy(up).to(torch.float32).permute(3, 0, 1, 2) / 255.0 * 2.0 - 1.0
    video = pad_to(video, *padded_size(height, width, multiple))
    return video.unsqueeze(0).to(dtype)


def output_frames(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Decoded (B, 3, F, H, W) in [-1, 1] -> (B*F, 3, height, width) float32 in [0, 1], padding cropped off."""
    b, c, f = video.shape[:3]
    x = crop_to(video, height, width).transpose(1, 2).reshape(b * f, c, height, width)
    return ((x.float() + 1) / 2).clamp(0, 1)
