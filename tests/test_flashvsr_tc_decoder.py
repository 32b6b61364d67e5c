"""FlashVSR's TC decoder: against an independent whole-sequence reference written from spec §1.5 (whole clip and
the engine's chunks), frame-by-frame == whole stream == chunked with carried memory, the batched path, the 3-frame
trim at stream start, the (4, 8, 8) conditioning layout, and the key layout."""

import pytest
import torch
import torch.nn.functional as F

from flashvsr_helpers import one_thread, tc_shapes, tiny_state_dicts
from streamvsr.models.flashvsr.frames import chunk
from streamvsr.models.flashvsr.tc_decoder import (TCDecoder, TCDecoderState, condition_frames_needed,
                                                  space_to_depth_condition, tc_config_from_state_dict)

@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


h, w = 2, 3  # latent size; frames are 16 x 24


@pytest.fixture(scope="module")
def decoder():
    sd = tiny_state_dicts(0)["tc_decoder"]
    model = TCDecoder(**tc_config_from_state_dict(sd))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def stream(latent_frames=10, seed=3):
    gen = torch.Generator().manual_seed(seed)
    lat = torch.randn(1, 16, latent_frames, h, w, generator=gen)
    lq = torch.rand(1, 3, 4 * latent_frames - 3, 8 * h, 8 * w, generator=gen) * 2 - 1
    return lat, lq


def run(decoder, lat, lq, pieces, **kw):
    """Decode in calls of ``pieces`` latent frames each, carrying the state."""
    state, out, l0, c0 = None, [], 0, 0
    for n in pieces:
        c1 = c0 + condition_frames_needed(n, state is None)
        frames, state = decoder.decode(lat[:, :, l0:l0 + n], lq[:, :, c0:c1], state, **kw)
        out.append(frames)
        l0, c0 = l0 + n, c1
    return torch.cat(out, dim=2), state


@torch.no_grad()
def test_frame_by_frame_equals_all_at_once_equals_chunks(decoder):
    lat, lq = stream(10)
    whole, _ = run(decoder, lat, lq, [10])
    per_frame, _ = run(decoder, lat, lq, [1] * 10)
    # the tiny-long chunking: 6 latents (21 frames), then 2 (8 frames) at a time
    chunks, _ = run(decoder, lat, lq, [6, 2, 2])
    assert whole.shape == (1, 3, 37, 16, 24)
    assert torch.equal(per_frame, whole) and torch.equal(chunks, whole)


@torch.no_grad()
def test_batched_path_matches_the_sequential_one(decoder):
    lat, lq = stream(10)
    ref, ref_state = run(decoder, lat, lq, [6, 2, 2])
    for pieces, per_batch in (([10], None), ([6, 2, 2], None), ([6, 2, 2], 1), ([3, 7], 2), ([1] * 10, None)):
        got, state = run(decoder, lat, lq, pieces, sequential=False, latents_per_batch=per_batch)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(state.memory, ref_state.memory):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_trim_only_at_stream_start(decoder):
    lat, lq = stream(3)
    first, state = decoder.decode(lat[:, :, :1], lq[:, :, :1])
    assert first.shape[2] == 1  # latent 0 stands for frame 0 alone
    more, state = decoder.decode(lat[:, :, 1:3], lq[:, :, 1:9], state)
    assert more.shape[2] == 8
    # a fresh stream trims again
    again, _ = decoder.decode(lat[:, :, 1:3], lq[:, :, 1:6])
    assert again.shape[2] == 5


@torch.no_grad()
def test_output_count_per_stream_length(decoder):
    for stream_frames in (25, 33, 41):
        p = (stream_frames - 1) // 8 - 2
        lat, lq = stream(2 * p + 4)
        out, _ = run(decoder, lat, lq, [6] + [2] * (p - 1))
        assert out.shape[2] == stream_frames - 4 == chunk(p - 1).output[1]


@torch.no_grad()
def test_memory_is_carried(decoder):
    lat, lq = stream(8)
    _, state = decoder.decode(lat[:, :, :6], lq[:, :, :21])
    carried, _ = decoder.decode(lat[:, :, 6:8], lq[:, :, 21:29], state)
    zeros = TCDecoderState(memory=tuple(torch.zeros_like(m) for m in state.memory), started=True)
    forgotten, _ = decoder.decode(lat[:, :, 6:8], lq[:, :, 21:29], zeros)
    assert carried.shape == forgotten.shape and not torch.allclose(carried, forgotten)
    tensors, meta = state.to_dict()
    restored = TCDecoderState.from_dict({k: v.clone() for k, v in tensors.items()}, dict(meta))
    again, _ = decoder.decode(lat[:, :, 6:8], lq[:, :, 21:29], restored.to("cpu"))
    assert torch.equal(again, carried)
    assert len(state.memory) == 9


def test_condition_layout():
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 3, 8, 16, 24, generator=gen)
    got = space_to_depth_condition(cond)
    assert got.shape == (2, 2, 768, 2, 3)
    for b, t, c, f, r, col, y, x in ((0, 0, 0, 0, 0, 0, 0, 0), (1, 1, 2, 3, 7, 5, 1, 2), (0, 1, 1, 2, 4, 7, 0, 1)):
        assert got[b, t, ((c * 4 + f) * 8 + r) * 8 + col, y, x] == cond[b, c, 4 * t + f, 8 * y + r, 8 * x + col]
    # 21 frames: 3 copies of frame 0 in front
    odd = space_to_depth_condition(cond[:, :, :5])
    padded = torch.cat([cond[:, :, :1]] * 3 + [cond[:, :, :5]], dim=2)
    assert torch.equal(odd, space_to_depth_condition(padded))


def test_wrong_conditioning_is_refused(decoder):
    lat, lq = stream(2)
    with pytest.raises(ValueError, match="need 5 conditioning frames"):
        decoder.decode(lat, torch.cat([lq, lq], dim=2)[:, :, :8])
    with pytest.raises(ValueError, match="need"):
        decoder.decode(lat, lq[:, :, :5, :8])


def test_keys_and_sizes():
    sd = tiny_state_dicts(0)["tc_decoder"]
    assert tc_config_from_state_dict(sd) == dict(channels=(32, 16, 8, 8), latent_channels=16)
    model = TCDecoder(device="meta")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == tc_shapes((512, 256, 128, 128))
    assert sum(p.numel() for p in model.parameters()) == 45_338_371  # the released TCDecoder


# --- Independent reference --------------------------------------------------------------------------------------

def _ref_conditioning(cond: torch.Tensor) -> torch.Tensor:
    """(3, F, H, W) -> (ceil(F/4), 768, H/8, W/8): spec §1.5 space-to-depth by (4 frames, 8, 8), channel order
    (c, frame, row, col), F front-padded to a multiple of 4 with copies of frame 0.

    Written as pixel_unshuffle of the 12 (c, frame) planes of each 4-frame group, c outermost: pixel_unshuffle
    appends (row, col) innermost, giving channel ((c * 4 + frame) * 8 + row) * 8 + col."""
    pad = -cond.shape[1] % 4
    cond = torch.cat([cond[:, :1]] * pad + [cond], dim=1)
    groups = [cond[:, t:t + 4].reshape(12, *cond.shape[2:]) for t in range(0, cond.shape[1], 4)]
    return torch.stack([F.pixel_unshuffle(g, 8) for g in groups])


def reference_decode(sd: dict, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The TC decoder of spec §1.5 on a whole stream at once, from the raw ``decoder.N`` tensors.

    latents (B, 16, T, h, w), cond (B, 3, 4T - 3, 8h, 8w) in [-1, 1]: the first T latents of a stream and their LR
    frames. Returns (B, 3, 4T - 3, 8h, 8w) in [-1, 1]. Each batch item is decoded on its own; a "sequence" is a
    (frames, C, h, w) tensor at the rate of the layer it enters. Memory is written as the explicit previous frame
    (zeros before the first), so there is no state and no streaming order to get right.

    Points the spec leaves open, settled by the official code (OpenImagingLab/FlashVSR @ccac0ac,
    examples/WanVSR/utils/TCDecoder.py, sequential ``parallel=False`` mode the pipelines use):
    - "split into 2 frames" after a TGrow conv: output channels [0, C) are the earlier frame, [C, 2C) the later.
    - MemBlock "previous time step" is counted at the block's own frame rate (after earlier TGrows), i.e. the
      previous frame of the same sequence; the skip is the identity (no skip weights exist in the layout).
    - 3x3 convolutions pad 1 pixel with zeros; "nearest upsample x2" repeats each pixel 2x2.
    - No clamp of the output: the decoder gives ~[0, 1], mapped by x * 2 - 1 as is.
    """
    def conv(x, idx, pad=1):
        return F.conv2d(x, sd[f"decoder.{idx}.weight"], sd.get(f"decoder.{idx}.bias"), padding=pad)

    def memblock(x, idx):
        # "past" = this block's input one frame earlier; zeros for the stream's first frame
        past = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
        y = torch.cat([x, past], dim=1)  # spec: conv(cat[x, past]), x first
        y = F.relu(conv(y, f"{idx}.conv.0"))
        y = F.relu(conv(y, f"{idx}.conv.2"))
        y = conv(y, f"{idx}.conv.4")
        return F.relu(y + x)

    def upsample(x):
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    def tgrow(x, idx, stride):
        # 1x1 conv to stride * C channels, channel group k = k-th of the frames that replace each input frame
        y = conv(x, f"{idx}.conv", pad=0)
        c = x.shape[1]
        return torch.stack([y[:, k * c:(k + 1) * c] for k in range(stride)], dim=1).flatten(0, 1)

    out = []
    for b in range(latents.shape[0]):
        # conditioning channels in front of the latent channels, one step per latent frame
        x = torch.cat([_ref_conditioning(cond[b]), latents[b].transpose(0, 1)], dim=1)
        x = torch.tanh(x / 3) * 3  # idx 0: Clamp on all 784 channels
        x = F.relu(conv(x, 1))
        x = F.relu(conv(x, 3))  # IdentityConv (random here, so it is exercised)
        for first_mem, grow, stride, nxt in ((5, 9, 1, 10), (11, 15, 2, 16), (17, 21, 2, 22)):
            for idx in range(first_mem, first_mem + 3):
                x = memblock(x, idx)
            x = tgrow(upsample(x), grow, stride)
            x = conv(x, nxt)  # no bias, no activation
        x = F.relu(x)
        x = F.relu(conv(x, 24))
        x = conv(x, 26)
        # 4 frames per latent; the first latent stands for frame 0 alone: drop the 3 warm-up frames
        out.append(x[3:].mul(2).sub(1).transpose(0, 1))
    return torch.stack(out)


def _ref_inputs(latent_frames, batch=2, seed=11):
    # two different batch items: a mix-up of batch and time (TGrow reshapes) cannot go unnoticed
    gen = torch.Generator().manual_seed(seed)
    lat = torch.randn(batch, 16, latent_frames, h, w, generator=gen)
    lq = torch.rand(batch, 3, 4 * latent_frames - 3, 8 * h, 8 * w, generator=gen) * 2 - 1
    return lat, lq


def test_reference_conditioning_layout():
    """The reference's own space-to-depth against explicit indexing, so that the comparisons below rest on it."""
    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(3, 5, 16, 24, generator=gen)
    got = _ref_conditioning(cond)
    padded = torch.cat([cond[:, :1]] * 3 + [cond], dim=1)
    for t, c, f, r, col, y, x in ((0, 0, 0, 0, 0, 0, 0), (1, 2, 3, 7, 5, 1, 2), (0, 1, 2, 4, 7, 0, 1)):
        assert got[t, ((c * 4 + f) * 8 + r) * 8 + col, y, x] == padded[c, 4 * t + f, 8 * y + r, 8 * x + col]


@torch.no_grad()
@pytest.mark.parametrize("sequential", [True, False])
def test_matches_the_spec_reference(sequential):
    sd = tiny_state_dicts(0)["tc_decoder"]
    model = TCDecoder(**tc_config_from_state_dict(sd))
    model.load_state_dict(sd, strict=True)
    model.eval()
    n_chunks = 4  # the engine's plan: 6 latents / 21 frames, then 2 latents / 8 frames per chunk
    plan = [chunk(i) for i in range(n_chunks)]
    lat, lq = _ref_inputs(plan[-1].latents[1])
    ref = reference_decode(sd, lat, lq)
    assert ref.shape == (2, 3, 45, 16, 24)

    # fp32 on CPU: only float rounding may differ (outputs are O(1)); every deliberate break seen moves them >= 2e-2
    whole, _ = model.decode(lat, lq, sequential=sequential)
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-5)

    state, pieces = None, []
    for c in plan:
        out, state = model.decode(lat[:, :, slice(*c.latents)], lq[:, :, slice(*c.output)], state,
                                  sequential=sequential)
        assert out.shape[2] == c.output[1] - c.output[0]
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=2), ref, rtol=1e-5, atol=1e-5)
