"""FlashVSR's frame arithmetic (lossless padding, chunk ranges), sizes (pad to 128 and crop back) and the
conditioning video (PIL bicubic of the 8-bit frame, mapped to [-1, 1])."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from streamvsr.models.flashvsr import frames as fr


@pytest.mark.parametrize("n", range(1, 101))
def test_every_input_frame_gets_its_output(n):
    padded = fr.padded_count(n)
    assert padded >= max(n, 21) and padded % 8 == 5 and padded - 8 < max(n, 21)
    stream = fr.stream_length(n)
    assert stream == padded + 4 and stream % 8 == 1
    chunks = fr.plan(n)
    assert len(chunks) == fr.num_chunks(stream) == (stream - 1) // 8 - 2

    made = []  # output frame indices, in emission order
    lq_end = latent_end = 0
    for c in chunks:
        assert c.lq[0] == lq_end and c.latents[0] == latent_end  # consumed in order, nothing skipped or repeated
        lq_end, latent_end = c.lq[1], c.latents[1]
        assert c.lq[1] == c.output[1] + fr.LOOKAHEAD <= stream  # 4 LR frames of look-ahead, inside the stream
        frames, latents = c.output[1] - c.output[0], c.latents[1] - c.latents[0]
        assert (frames, latents) == ((21, 6) if c.index == 0 else (8, 2))
        assert frames == 4 * latents - (3 if c.index == 0 else 0)
        # LQ projection: 1 priming frame + 4 per latent on the first chunk, 4 per latent after
        assert c.lq[1] - c.lq[0] == 4 * latents + (1 if c.index == 0 else 0)
        made.extend(range(*c.output))
    assert lq_end == stream and latent_end == (stream - 1) // 4
    assert made == list(range(padded))  # one output per padded-stream frame, in order
    kept = made[:n]
    assert [fr.source_frame(j, n) for j in kept] == list(range(n))  # output j is input frame j
    assert all(fr.source_frame(j, n) == n - 1 for j in range(n, stream))  # padding repeats the last frame


def test_chunk_boundaries():
    assert fr.chunk(0) == fr.Chunk(0, (0, 25), (0, 6), (0, 21))
    assert fr.chunk(1) == fr.Chunk(1, (25, 33), (6, 8), (21, 29))
    assert fr.chunk(5) == fr.Chunk(5, (57, 65), (14, 16), (53, 61))
    assert fr.chunk(3).needs == 49
    assert [len(fr.plan(n)) for n in (1, 21, 22, 29, 30)] == [1, 1, 2, 2, 3]


def test_official_frame_count_drops_the_tail():
    # spec §1.8 / FlashVSR#36, 1038lab#3: 81 -> 77, 100 -> 93, 145 -> 141, 200 -> 197
    assert [fr.official_stream_length(n) - 4 for n in (81, 100, 145, 200)] == [77, 93, 141, 197]
    for n in range(21, 200):
        assert fr.stream_length(n) - 4 >= n >= fr.official_stream_length(n) - 4


def test_chunks_ready_before_the_end_is_known():
    for available in range(0, 120):
        ready = fr.chunks_ready(available)
        assert all(fr.chunk(i).needs <= available for i in range(ready))
        assert fr.chunk(ready).needs > available
        for final in range(max(available, 1), 130):
            assert ready <= len(fr.plan(final))  # whatever the final length, these chunks are part of its plan


def test_sizes():
    assert fr.output_size(90, 160, 4) == (360, 640)
    assert fr.padded_size(360, 640) == (384, 640)
    assert fr.padded_size(128, 129) == (128, 256)
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    padded = fr.pad_to(x, 8, 9)
    assert padded.shape == (2, 3, 8, 9)
    assert torch.equal(fr.crop_to(padded, 5, 7), x)
    assert torch.equal(padded[..., 5:, :7], x[..., 4:5, :].expand(-1, -1, 3, -1))  # bottom rows repeat the last
    assert torch.equal(padded[..., :5, 7:], x[..., :, 6:7].expand(-1, -1, -1, 2))
    assert fr.pad_to(x, 5, 7) is x
    with pytest.raises(ValueError):
        fr.pad_to(x, 4, 7)


def test_quantisation_recovers_8bit_values():
    levels = torch.arange(256, dtype=torch.float32) / 255  # what ComfyUI's loaders produce
    assert torch.equal(fr.quantize_8bit(levels), torch.arange(256, dtype=torch.uint8))
    off_grid = torch.tensor([0.5 / 255, 1.49 / 255, 1.51 / 255, -0.2, 1.3])
    assert fr.quantize_8bit(off_grid).tolist() == [0, 1, 2, 0, 255]  # nearest level, half to even, clamped


def _pil_reference(pixels, size):
    """uint8 (h, w, 3) -> what the official script feeds the network: PIL bicubic, then v / 255 * 2 - 1."""
    up = Image.fromarray(pixels).resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.array(up, dtype=np.uint8)).float().permute(2, 0, 1) / 255.0 * 2.0 - 1.0


def test_conditioning_is_pil_bicubic():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 24, 40, 3), dtype=np.uint8)
    frames = torch.from_numpy(pixels).float() / 255  # (n, h, w, 3), as a ComfyUI IMAGE
    got = fr.condition_video(frames, 4, channels_last=True)
    assert got.shape == (1, 3, 3, 128, 256) and got.dtype == torch.float32
    for i in range(3):
        ref = _pil_reference(pixels[i], (96, 160))
        assert torch.equal(got[0, :, i, :96, :160], ref)
        assert torch.equal(got[0, :, i, 96:, :160], ref[:, -1:].expand(-1, 32, -1))  # replicate padding
        assert torch.equal(got[0, :, i, :96, 160:], ref[:, :, -1:].expand(-1, -1, 96))
    same = fr.condition_video(frames.permute(0, 3, 1, 2), 4, dtype=torch.bfloat16)
    assert same.dtype == torch.bfloat16 and torch.equal(same, got.bfloat16())
    # PIL's bicubic is not torch's (a = -0.5 vs -0.75): using F.interpolate would not match the official input
    torch_bicubic = F.interpolate(frames.permute(0, 3, 1, 2), size=(96, 160), mode="bicubic") * 2 - 1
    assert (torch_bicubic[0] - got[0, :, 0, :96, :160]).abs().max() > 0.02


def test_conditioning_without_padding_and_at_other_scales():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(1, 32, 64, 3), dtype=np.uint8)
    frames = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    got = fr.condition_video(frames, 4)  # 128 x 256: already multiples of 128
    assert torch.equal(got[0, :, 0], _pil_reference(pixels[0], (128, 256)))
    got = fr.condition_video(frames, 2, multiple=64)
    assert got.shape[-2:] == (64, 128)
    with pytest.raises(ValueError, match="frames must be"):
        fr.condition_video(frames[0], 4)


def test_output_frames():
    video = torch.linspace(-1.2, 1.2, 2 * 3 * 4 * 8 * 8).reshape(2, 3, 4, 8, 8)
    out = fr.output_frames(video, 6, 5)
    assert out.shape == (8, 3, 6, 5) and out.dtype == torch.float32
    assert torch.equal(out[5], ((video[1, :, 1, :6, :5] + 1) / 2).clamp(0, 1))
