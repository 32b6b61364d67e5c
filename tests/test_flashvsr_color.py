"""FlashVSR's colour correction: AdaIN against its formula, the wavelet fix against an independent per-pixel
implementation, the clamp, and per-frame independence (chunking does not change it)."""

import numpy as np
import pytest
import torch

from flashvsr_helpers import one_thread
from streamvsr.models.flashvsr.color import adain, color_fix, wavelet

@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


gen = torch.Generator().manual_seed(0)
OUT = torch.randn(2, 3, 5, 20, 28, generator=gen) * 0.6 + 0.1  # decoder output, slightly off in colour
LR = torch.rand(2, 3, 5, 20, 28, generator=gen) * 1.6 - 0.8


def adain_formula(x, ref):
    """Per frame and channel, in float64: (x - mean) / sqrt(var + 1e-5) * sqrt(var_ref + 1e-5) + mean_ref with
    population variances."""
    x, ref = x.double().numpy(), ref.double().numpy()
    out = np.empty_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            a, b = x[n, c], ref[n, c]
            sa = np.sqrt(((a - a.mean()) ** 2).mean() + 1e-5)
            sb = np.sqrt(((b - b.mean()) ** 2).mean() + 1e-5)
            out[n, c] = (a - a.mean()) / sa * sb + b.mean()
    return torch.from_numpy(out)


def binomial_lowpass(img, levels=5):
    """Cascade of 3x3 [1,2,1]x[1,2,1]/16 blurs with taps 2^i apart, borders clamped, one pixel at a time."""
    k = np.array([1, 2, 1]) / 4
    low = img.copy()
    hgt, wid = img.shape
    for i in range(levels):
        d = 2 ** i
        nxt = np.zeros_like(low)
        for y in range(hgt):
            for x in range(wid):
                nxt[y, x] = sum(k[a] * k[b] * low[min(max(y + (a - 1) * d, 0), hgt - 1),
                                              min(max(x + (b - 1) * d, 0), wid - 1)]
                                for a in range(3) for b in range(3))
        low = nxt
    return low


def test_adain_matches_its_formula():
    x, ref = OUT[:, :, 0], LR[:, :, 0]
    torch.testing.assert_close(adain(x, ref).double(), adain_formula(x, ref), rtol=1e-5, atol=1e-5)


def test_color_fix_adain_is_per_frame_and_clamped():
    got = color_fix(OUT, LR, "adain")
    frames = OUT.transpose(1, 2).flatten(0, 1)
    refs = LR.transpose(1, 2).flatten(0, 1)
    want = adain_formula(frames, refs).clamp(-1, 1).reshape(2, 5, 3, 20, 28).transpose(1, 2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert got.min() >= -1 and got.max() <= 1
    assert (adain(frames, refs).abs() > 1).any()  # so the clamp was exercised


def test_wavelet_matches_an_independent_implementation():
    x, ref = OUT[0, :, 0], LR[0, :, 0]  # (3, 20, 28): small enough for the per-pixel loops, smaller than 2^4
    got = wavelet(x[None], ref[None])[0].double()
    for c in range(3):
        a, b = x[c].double().numpy(), ref[c].double().numpy()
        # the bands telescope: high frequencies of x = x - lowpass(x)
        want = a - binomial_lowpass(a) + binomial_lowpass(b)
        torch.testing.assert_close(got[c], torch.from_numpy(want), rtol=1e-5, atol=1e-5)


def test_wavelet_color_fix_is_clamped_per_frame():
    got = color_fix(OUT, LR, "wavelet")
    frames = OUT.transpose(1, 2).flatten(0, 1)
    refs = LR.transpose(1, 2).flatten(0, 1)
    want = wavelet(frames, refs).clamp(-1, 1).reshape(2, 5, 3, 20, 28).transpose(1, 2)
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_chunks_equal_whole(method):
    whole = color_fix(OUT, LR, method)
    parts = torch.cat([color_fix(OUT[:, :, i:j], LR[:, :, i:j], method) for i, j in ((0, 2), (2, 3), (3, 5))], 2)
    assert torch.equal(parts, whole)
    four_d = color_fix(OUT[:, :, 1], LR[:, :, 1], method)
    assert torch.equal(four_d, whole[:, :, 1])


def test_none_and_errors():
    assert color_fix(OUT, LR, "none") is OUT
    with pytest.raises(ValueError, match="not one of"):
        color_fix(OUT, LR, "histogram")
    with pytest.raises(ValueError, match="one shape"):
        color_fix(OUT, LR[:, :, :2], "adain")


def test_dtype_follows_the_input():
    got = color_fix(OUT.bfloat16(), LR.bfloat16(), "adain")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), color_fix(OUT, LR, "adain"), rtol=0.05, atol=0.05)
