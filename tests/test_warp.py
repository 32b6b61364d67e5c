"""Warps against formulas written out in the test (spec §3.5 for the official one)."""

import pytest
import torch

from streamvsr.models.shared.warp import backward_warp, flow_warp_official


def test_official_warp_zero_flow_on_ones():
    # Spec §3.5: with zero flow an all-ones image comes back at 0.5 on the edges and 0.25 in the corners.
    x = torch.ones(1, 1, 8, 4)
    out = flow_warp_official(x, torch.zeros(1, 2, 8, 4))
    assert torch.allclose(out[0, 0, 0, 0], torch.tensor(0.25))
    assert torch.allclose(out[0, 0, 0, 1:3], torch.tensor([0.5, 0.5]))
    assert torch.allclose(out[0, 0, 3, 1:3], torch.tensor([1.0, 1.0]))


def _official_reference(x, flow):
    # Sampling position per axis of size S: p' = (p + f) * S / (S - 1) - 0.5 (pixel centres), bilinear, zeros.
    _, c, h, w = x.shape
    out = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            py = (i + flow[0, 1, i, j].item()) * h / (h - 1) - 0.5
            px = (j + flow[0, 0, i, j].item()) * w / (w - 1) - 0.5
            y0, x0 = int(torch.floor(torch.tensor(py))), int(torch.floor(torch.tensor(px)))
            for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[0, :, i, j] += wy * wx * x[0, :, yy, xx]
    return out


def test_official_warp_matches_pointwise_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 7, 9, generator=g)
    flow = torch.randn(1, 2, 7, 9, generator=g) * 2
    assert torch.allclose(flow_warp_official(x, flow), _official_reference(x, flow), atol=1e-5)


def test_official_warp_keeps_fp32_grid_for_half_inputs():
    x = torch.rand(1, 3, 16, 2000)
    flow = torch.full((1, 2, 16, 2000), 0.3)
    a = flow_warp_official(x.half(), flow).float()
    b = flow_warp_official(x, flow)
    assert a.dtype == torch.float32 and (a - b).abs().max() < 2e-3


def test_backward_warp_integer_shift_is_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 6, 8, generator=g)
    flow = torch.zeros(1, 2, 6, 8)
    flow[:, 0] = 2  # out(y, x) = in(y, x + 2)
    flow[:, 1] = -1  # out(y, x) = in(y - 1, x + 2)
    out = backward_warp(x, flow)
    # Exact up to the float rounding of the normalised grid coordinates.
    assert torch.allclose(out[..., 1:, :6], x[..., :5, 2:], atol=1e-6)
    assert torch.allclose(backward_warp(x, torch.zeros(1, 2, 6, 8)), x, atol=1e-6)


def _spec_warp(x, flow):
    """Spec §3.5 literally: base grid (x, y) per pixel, vg = grid + flow with flow as (B, H, W, 2), normalised with
    2v / max(S - 1, 1) - 1, grid_sample bilinear / zeros / align_corners=False."""
    h, w = x.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    vg = torch.stack((xs, ys), dim=2).float()[None] + flow.permute(0, 2, 3, 1)
    vx = 2.0 * vg[..., 0] / max(w - 1, 1) - 1.0
    vy = 2.0 * vg[..., 1] / max(h - 1, 1) - 1.0
    return torch.nn.functional.grid_sample(x, torch.stack((vx, vy), dim=3), mode="bilinear", padding_mode="zeros",
                                           align_corners=False)


def test_official_warp_follows_the_spec_recipe_step_by_step():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 6, generator=g)
    flow = torch.randn(2, 2, 5, 6, generator=g) * 1.5
    assert torch.allclose(flow_warp_official(x, flow), _spec_warp(x, flow), atol=1e-6)


@pytest.mark.parametrize("size", [(1, 5), (5, 1), (1, 1)])
def test_official_warp_of_one_pixel_wide_frames_does_not_divide_by_zero(size):
    """A side of one pixel normalises by max(S - 1, 1) = 1, not by 0: the spec's numbers, e.g. [0.25, 0.5, 0.5, 0.5,
    0.25] for a row of ones (the normalised grid lands between pixels, half outside at the ends)."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 2, *size, generator=g) + 0.5
    flow = torch.rand(1, 2, *size, generator=g) - 0.5
    assert torch.allclose(flow_warp_official(x, flow), _spec_warp(x, flow), atol=1e-6)
    ones = torch.ones(1, 1, 1, 5)
    assert torch.allclose(flow_warp_official(ones, torch.zeros(1, 2, 1, 5)).flatten(),
                          torch.tensor([0.25, 0.5, 0.5, 0.5, 0.25]), atol=1e-6)


def test_backward_warp_fractional_flow_is_linear_interpolation():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 2, 5, 7, generator=g)
    flow = torch.zeros(1, 2, 5, 7)
    flow[:, 0] = 0.25
    flow[:, 1] = 0.5
    out = backward_warp(x, flow)
    # out(y, x) = x(y + 0.5, x + 0.25), bilinear, inside the frame
    top = 0.75 * x[..., :-1, :-1] + 0.25 * x[..., :-1, 1:]
    bottom = 0.75 * x[..., 1:, :-1] + 0.25 * x[..., 1:, 1:]
    assert torch.allclose(out[..., :-1, :-1], 0.5 * top + 0.5 * bottom, atol=1e-6)


def test_backward_warp_border_and_zeros_padding():
    x = torch.arange(12, dtype=torch.float32).view(1, 1, 3, 4)
    flow = torch.zeros(1, 2, 3, 4)
    flow[:, 0] = 10.0  # far to the right of every pixel
    assert torch.equal(backward_warp(x, flow), x[..., 3:4].expand(1, 1, 3, 4))  # border: last column
    assert torch.equal(backward_warp(x, flow, padding_mode="zeros"), torch.zeros_like(x))


def test_warps_keep_the_input_dtype_and_check_shapes():
    x = torch.rand(1, 3, 8, 10)
    flow = torch.randn(1, 2, 8, 10)
    for warp in (flow_warp_official, backward_warp):
        out = warp(x.to(torch.bfloat16), flow)
        assert out.dtype == torch.bfloat16
        assert (out.float() - warp(x, flow)).abs().max() < 1e-2
        with pytest.raises(ValueError, match="flow must be"):
            warp(x, flow.permute(0, 2, 3, 1))
