"""The channels-last group norm (shared/norms.py) against PyTorch's, and its use in the UNet.

It runs on CUDA only (PyTorch's CPU group norm keeps channels-last by itself); here the CPU stands in for the GPU
by adding "cpu" to the devices it runs on.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_UNET

import streamvsr.models.shared.norms as norms
from streamvsr.models.shared.errors import UserInputError
from streamvsr.models.stream_diffvsr.unet import UNet

SHAPES = [  # (n, c, h, w, groups, mean): the mean offset makes the variance a small difference of big sums
    (1, 64, 9, 13, 32, 0.0),
    (2, 96, 5, 7, 8, 10.0),
    (1, 256, 23, 40, 32, 3.0),
]


def _input(n, c, h, w, mean, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g) * 2 + mean + torch.randn(1, c, 1, 1, generator=g)
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def _weights(c, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, generator=g).to(dtype), torch.randn(c, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_group_norm_within_one_unit_in_the_last_place(shape, dtype):
    n, c, h, w, groups, mean = shape
    x = _input(n, c, h, w, mean, dtype)
    weight, bias = _weights(c, dtype)
    got = norms.group_norm_channels_last(x, groups, weight, bias, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    exact = F.group_norm(x.double(), groups, weight.double(), bias.double(), 1e-5)
    # one unit in the last place of the result (rounding the exact value gives at most half of one)
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(1)
    assert ((got.double() - exact).abs() <= ulp).all()
    torch_half = F.group_norm(x.contiguous(), groups, weight, bias, 1e-5)  # PyTorch's own kernel, same bound
    assert ((torch_half.double() - exact).abs() <= ulp).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_is_close(shape):
    """In float32 the sums' cancellation shows (hence half precision only in ``group_norm``), but stays small."""
    n, c, h, w, groups, mean = shape
    x = _input(n, c, h, w, mean, torch.float32)
    weight, bias = _weights(c, torch.float32)
    got = norms.group_norm_channels_last(x, groups, weight, bias, 1e-6)
    assert (got - F.group_norm(x, groups, weight, bias, 1e-6)).abs().max() <= 1e-4


def test_which_inputs_take_the_channels_last_path(monkeypatch):
    calls = []
    monkeypatch.setattr(norms, "group_norm_channels_last", lambda *a: calls.append(a) or torch.zeros(1))
    norm = torch.nn.GroupNorm(4, 16).to(torch.float16)
    x = _input(1, 16, 5, 6, 0.0, torch.float16)
    norms.group_norm(norm, x)
    assert not calls  # the CPU keeps the layout by itself
    monkeypatch.setattr(norms, "CHANNELS_LAST_DEVICES", ("cuda", "cpu"))
    norms.group_norm(norm, x)
    assert len(calls) == 1
    norms.group_norm(norm, x.contiguous())  # NCHW: PyTorch's kernel
    norms.group_norm(norm.float(), x.float())  # float32: PyTorch's kernel
    managed = copy.deepcopy(norm).half()
    managed.comfy_cast_weights = True  # ComfyUI casts this layer's weights on the fly: its own forward must run
    norms.group_norm(managed, x)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unet_channels_last_keeps_every_norm_in_layout(monkeypatch, dtype):
    """A channels-last half-precision UNet takes the path at every group norm and is as close to the float32
    network as with PyTorch's norms."""
    torch.manual_seed(0)
    unet = UNet(TINY_UNET).eval()
    with torch.no_grad():
        for p in unet.parameters():  # away from the zero init of some layers
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 7, 11, 13, generator=g), torch.randn(1, 77, 32, generator=g)
    half = copy.deepcopy(unet).to(dtype).to(memory_format=torch.channels_last)
    x_half = x.to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = unet(x, 499, ctx)
        with_torch_norms = half(x_half, 499, ctx.to(dtype))
        calls = []
        path = norms.group_norm_channels_last
        monkeypatch.setattr(norms, "group_norm_channels_last", lambda *a: calls.append(1) or path(*a))
        monkeypatch.setattr(norms, "CHANNELS_LAST_DEVICES", ("cuda", "cpu"))
        kept = half(x_half, 499, ctx.to(dtype))
    assert len(calls) == sum(isinstance(m, torch.nn.GroupNorm) for m in half.modules()) > 0
    assert kept.is_contiguous(memory_format=torch.channels_last)
    assert (kept.float() - exact).abs().max() <= 1.5 * (with_torch_norms.float() - exact).abs().max()


def test_which_devices_store_networks_channels_last(monkeypatch):
    monkeypatch.delenv(norms.LAYOUT_ENV, raising=False)
    assert norms.prefers_channels_last("cuda:0", torch.float16)
    assert norms.prefers_channels_last(torch.device("cuda"), torch.bfloat16)
    assert not norms.prefers_channels_last("cuda", torch.float32)  # float32: NCHW, as loaded
    assert not norms.prefers_channels_last("cpu", torch.bfloat16)  # the oneDNN layers choose their own layouts
    assert not norms.prefers_channels_last("mps", torch.float16)
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)  # ROCm builds call their GPUs "cuda" too
    assert not norms.prefers_channels_last("cuda", torch.float16)


def test_the_environment_can_keep_networks_nchw(monkeypatch):
    monkeypatch.setenv("STREAMVSR_CHANNELS_LAST", "off")
    assert not norms.prefers_channels_last("cuda", torch.float16)
    monkeypatch.setenv("STREAMVSR_CHANNELS_LAST", " Auto ")
    assert norms.prefers_channels_last("cuda", torch.float16)
    monkeypatch.setenv("STREAMVSR_CHANNELS_LAST", "0")
    with pytest.raises(UserInputError, match="STREAMVSR_CHANNELS_LAST='0': use auto"):
        norms.prefers_channels_last("cuda", torch.float16)
