"""FlashVSR's TC decoder: frame-by-frame == whole stream == chunked with carried memory, the batched path, the
3-frame trim at stream start, the (4, 8, 8) conditioning layout, and the key layout."""

import pytest
import torch

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
