"""RAFT optical flow (large and small) with torchvision-compatible state-dict keys.

The network is written to keep a 5120x2880 pair within a few GiB on the CPU: the two images go through the
feature encoder one at a time (instance norm is per image, so this changes nothing), norms and residual
additions work in place when no gradient is needed, encoders run channels-last on the CPU (oneDNN then needs no
reordered copies of 1 GB activations), and the final convex upsampling runs in bands of rows. The correlation
lookup (all-pairs or on demand) is in ``correlation.py``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..shared.runtime import available_memory, device_memory
from .correlation import (NUM_LEVELS, AllPairsCorrelation, OnDemandCorrelation, padded_size,
                          select_correlation)


def _in_place(x: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and x.requires_grad)


class InstanceNorm(nn.InstanceNorm2d):
    """torchvision's parameter-free instance norm, normalising in place when no gradient is needed."""

    def forward(self, x):
        if self.affine or self.track_running_stats or x.dtype != torch.float32 or not _in_place(x):
            return super().forward(x)
        var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        return x.sub_(mean).mul_(var.add_(self.eps).rsqrt_())


class BatchNorm(nn.BatchNorm2d):
    """Inference batch norm as one in-place scale and shift (the encoders' maps are up to ~1 GB at 5K)."""

    def forward(self, x):
        if self.training or not _in_place(x):
            return super().forward(x)
        # Cast to the input: ComfyUI's partial loading only moves the layers it knows about.
        scale = self.weight.to(x.device, torch.float32) * torch.rsqrt(
            self.running_var.to(x.device, torch.float32) + self.eps)
        shift = self.bias.to(x.device, torch.float32) - self.running_mean.to(x.device, torch.float32) * scale
        return x.mul_(scale.to(x.dtype).view(1, -1, 1, 1)).add_(shift.to(x.dtype).view(1, -1, 1, 1))


def _conv_norm_act(cin, cout, kernel, stride=1, norm=None, act=True, operations=nn, device=None, dtype=None):
    # The layout of torchvision's Conv2dNormActivation: an nn.Sequential whose indices are the state-dict keys.
    layers = [operations.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, device=device,
                                dtype=dtype)]
    if norm == "instance":
        layers.append(InstanceNorm(cout))
    elif norm == "batch":
        layers.append(BatchNorm(cout, device=device, dtype=dtype))
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _add_relu(y, shortcut):
    return y.add_(shortcut).relu_() if _in_place(y) else F.relu(y + shortcut)


class ResidualBlock(nn.Module):
    def __init__(self, cin, cout, norm, stride, ops, device, dtype):
        super().__init__()
        kw = dict(operations=ops, device=device, dtype=dtype)
        self.convnormrelu1 = _conv_norm_act(cin, cout, 3, stride, norm, **kw)
        self.convnormrelu2 = _conv_norm_act(cout, cout, 3, 1, norm, **kw)
        self.downsample = _conv_norm_act(cin, cout, 1, stride, norm, act=False, **kw) if stride != 1 else None

    def forward(self, x):
        y = self.convnormrelu2(self.convnormrelu1(x))
        return _add_relu(y, x if self.downsample is None else self.downsample(x))


class BottleneckBlock(nn.Module):
    def __init__(self, cin, cout, norm, stride, ops, device, dtype):
        super().__init__()
        kw = dict(operations=ops, device=device, dtype=dtype)
        self.convnormrelu1 = _conv_norm_act(cin, cout // 4, 1, 1, norm, **kw)
        self.convnormrelu2 = _conv_norm_act(cout // 4, cout // 4, 3, stride, norm, **kw)
        self.convnormrelu3 = _conv_norm_act(cout // 4, cout, 1, 1, norm, **kw)
        self.downsample = _conv_norm_act(cin, cout, 1, stride, norm, act=False, **kw) if stride != 1 else None

    def forward(self, x):
        y = self.convnormrelu3(self.convnormrelu2(self.convnormrelu1(x)))
        return _add_relu(y, x if self.downsample is None else self.downsample(x))


class FeatureEncoder(nn.Module):
    """Downsamples by 8; used as the feature encoder (instance norm) and the context encoder."""

    def __init__(self, block, layers, norm, ops, device, dtype):
        super().__init__()
        strides = (2, 1, 2, 2)
        self.convnormrelu = _conv_norm_act(3, layers[0], 7, strides[0], norm, operations=ops, device=device,
                                           dtype=dtype)
        for i in range(3):
            self.add_module(f"layer{i + 1}", nn.Sequential(
                block(layers[i], layers[i + 1], norm, strides[i + 1], ops, device, dtype),
                block(layers[i + 1], layers[i + 1], norm, 1, ops, device, dtype)))
        self.conv = ops.Conv2d(layers[3], layers[4], 1, device=device, dtype=dtype)

    def forward(self, x):
        if x.device.type == "cpu":
            # oneDNN convolves NHWC tensors directly; NCHW ones are reordered into extra full-size copies.
            x = x.contiguous(memory_format=torch.channels_last)
        return self.conv(self.layer3(self.layer2(self.layer1(self.convnormrelu(x)))))


class MotionEncoder(nn.Module):
    def __init__(self, corr_ch, corr_layers, flow_layers, out_ch, ops, device, dtype):
        super().__init__()
        kw = dict(operations=ops, device=device, dtype=dtype)
        self.convcorr1 = _conv_norm_act(corr_ch, corr_layers[0], 1, **kw)
        self.convcorr2 = _conv_norm_act(corr_layers[0], corr_layers[1], 3, **kw) if len(corr_layers) == 2 else None
        self.convflow1 = _conv_norm_act(2, flow_layers[0], 7, **kw)
        self.convflow2 = _conv_norm_act(flow_layers[0], flow_layers[1], 3, **kw)
        self.conv = _conv_norm_act(corr_layers[-1] + flow_layers[-1], out_ch - 2, 3, **kw)

    def forward(self, flow, corr):
        corr = self.convcorr1(corr)
        if self.convcorr2 is not None:
            corr = self.convcorr2(corr)
        motion = self.conv(torch.cat([corr, self.convflow2(self.convflow1(flow))], dim=1))
        if flow.device.type == "cpu":
            # The convolutions hand back channels-last maps; an NCHW flow here would make the concatenation, and
            # so every GRU input, NCHW, which the GRU's convolutions then reorder: three 384-channel copies per
            # update, about a tenth of RAFT's time at 256x256. Same numbers either way.
            flow = flow.contiguous(memory_format=torch.channels_last)
        return torch.cat([motion, flow], dim=1)


class ConvGRU(nn.Module):
    def __init__(self, in_ch, hidden, kernel, padding, ops, device, dtype):
        super().__init__()
        for name in ("convz", "convr", "convq"):
            setattr(self, name, ops.Conv2d(hidden + in_ch, hidden, kernel, padding=padding, device=device,
                                           dtype=dtype))

    def forward(self, h, x):
        hx = torch.cat([h, x], dim=1)
        z = torch.sigmoid(self.convz(hx))
        r = torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q


class RecurrentBlock(nn.Module):
    def __init__(self, in_ch, hidden, kernels, paddings, ops, device, dtype):
        super().__init__()
        self.hidden_size = hidden
        self.convgru1 = ConvGRU(in_ch, hidden, kernels[0], paddings[0], ops, device, dtype)
        self.convgru2 = ConvGRU(in_ch, hidden, kernels[1], paddings[1], ops, device, dtype) if len(kernels) > 1 \
            else None

    def forward(self, h, x):
        h = self.convgru1(h, x)
        return h if self.convgru2 is None else self.convgru2(h, x)


class FlowHead(nn.Module):
    def __init__(self, in_ch, hidden, ops, device, dtype):
        super().__init__()
        self.conv1 = ops.Conv2d(in_ch, hidden, 3, padding=1, device=device, dtype=dtype)
        self.conv2 = ops.Conv2d(hidden, 2, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


class UpdateBlock(nn.Module):
    def __init__(self, motion_encoder, recurrent_block, flow_head):
        super().__init__()
        self.motion_encoder = motion_encoder
        self.recurrent_block = recurrent_block
        self.flow_head = flow_head

    def forward(self, hidden, context, corr, flow):
        x = torch.cat([context, self.motion_encoder(flow, corr)], dim=1)
        hidden = self.recurrent_block(hidden, x)
        return hidden, self.flow_head(hidden)


class MaskPredictor(nn.Module):
    def __init__(self, in_ch, hidden, ops, device, dtype):
        super().__init__()
        self.convrelu = _conv_norm_act(in_ch, hidden, 3, operations=ops, device=device, dtype=dtype)
        self.conv = ops.Conv2d(hidden, 8 * 8 * 9, 1, device=device, dtype=dtype)

    def forward(self, x):
        return 0.25 * self.conv(self.convrelu(x))


# name -> (feature/context block, feature layers, context layers, context norm, corr radius, motion corr layers,
#          motion flow layers, motion out, hidden, gru kernels, gru paddings, flow head hidden, mask predictor)
ARCHS = {
    "raft_large": (ResidualBlock, (64, 64, 96, 128, 256), (64, 64, 96, 128, 256), "batch", 4, (256, 192),
                   (128, 64), 128, 128, ((1, 5), (5, 1)), ((0, 2), (2, 0)), 256, True),
    "raft_small": (BottleneckBlock, (32, 32, 64, 96, 128), (32, 32, 64, 96, 160), None, 3, (96,),
                   (64, 32), 82, 96, (3,), (1,), 128, False),
}


class RAFT(nn.Module):
    """``forward(image1, image2)`` returns the final (B, 2, H, W) flow that backward-warps image2 onto image1.

    Images are in [-1, 1]. Any size works: inputs are padded (edge replicate) to a multiple of 8 and at least
    128 px, and the flow is cropped back. ``corr``: "all_pairs", "on_demand" or "auto" (``select_correlation``
    with the device's memory and what is free on it, decided once per input shape). ``block_bytes`` bounds the
    on-demand lookup's and the upsampling's temporaries.
    """

    # the submodules that do the work at the image sizes, called once per pair (the encoders, with fixed shapes)
    # or once per update (the update block, same shapes every time): what a compiled path compiles
    PARTS = ("feature_encoder", "context_encoder", "update_block")

    def __init__(self, arch: str = "raft_large", operations=nn, device=None, dtype=None):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown RAFT architecture {arch!r} (use one of {sorted(ARCHS)})")
        (block, f_layers, c_layers, c_norm, radius, corr_layers, flow_layers, motion_out, hidden, kernels, pads,
         head_hidden, use_mask) = ARCHS[arch]
        self.arch, self.radius, self.hidden = arch, radius, hidden
        # corr="auto" decided once per input shape, device and dtype: the two paths differ by float rounding, so
        # every frame of a sequence (and every run with this model) takes the one the first frame took
        self._auto_corr: dict = {}
        self.feature_encoder = FeatureEncoder(block, f_layers, "instance", operations, device, dtype)
        self.context_encoder = FeatureEncoder(block, c_layers, c_norm, operations, device, dtype)
        corr_ch = NUM_LEVELS * (2 * radius + 1) ** 2
        motion = MotionEncoder(corr_ch, corr_layers, flow_layers, motion_out, operations, device, dtype)
        recurrent = RecurrentBlock(motion_out + c_layers[-1] - hidden, hidden, kernels, pads, operations, device,
                                   dtype)
        self.update_block = UpdateBlock(motion, recurrent, FlowHead(hidden, head_hidden, operations, device, dtype))
        self.mask_predictor = MaskPredictor(hidden, 256, operations, device, dtype) if use_mask else None

    def forward(self, image1, image2, num_flow_updates: int = 12, corr: str = "auto",
                block_bytes: int = 256 << 20, fmap2=None, return_fmap1: bool = False, parts=None):
        """``fmap2``: image2's features from an earlier call (the ``fmap1`` that ``return_fmap1=True`` returned
        for it as image1), so image2 is not encoded again; the encoder is per image, so the flow is the same.
        With ``return_fmap1`` the result is ``(flow, fmap1)``. ``parts``: callables that stand in for some of
        ``PARTS`` (e.g. compiled versions of them), by name."""
        if image1.shape != image2.shape or image1.ndim != 4 or image1.shape[1] != 3:
            raise ValueError(f"images must both be (B, 3, H, W), got {tuple(image1.shape)} and "
                             f"{tuple(image2.shape)}")
        if corr == "auto":
            key = (tuple(image1.shape), str(image1.device), image1.dtype)
            if key not in self._auto_corr:
                # a quarter of the device's memory or half of what is free now, whichever is less
                memory = min(device_memory(image1.device), 2 * available_memory(image1.device))
                self._auto_corr[key] = select_correlation(*image1.shape[-2:], memory, image1.shape[0],
                                                          image1.element_size())
            corr = self._auto_corr[key]
        if corr not in ("all_pairs", "on_demand"):
            raise ValueError(f"corr must be 'auto', 'all_pairs' or 'on_demand', got {corr!r}")
        h, w = image1.shape[-2:]
        ph, pw = padded_size(h, w)
        if (ph, pw) != (h, w):
            image1 = F.pad(image1, (0, pw - w, 0, ph - h), mode="replicate")
            image2 = F.pad(image2, (0, pw - w, 0, ph - h), mode="replicate")
        # Instance norm is per image: encoding the images one at a time gives the features of torchvision's
        # batched call with half the peak memory.
        parts = parts or {}
        encode = parts.get("feature_encoder", self.feature_encoder)
        update = parts.get("update_block", self.update_block)
        fmap1 = encode(image1)
        if fmap2 is None:
            fmap2 = encode(image2)
        elif fmap2.shape != fmap1.shape:
            raise ValueError(f"fmap2 {tuple(fmap2.shape)} does not match image1's features {tuple(fmap1.shape)}")
        del image2
        # Both lookups only read the feature maps, so fmap1 can serve as the next call's fmap2.
        lookup = (AllPairsCorrelation if corr == "all_pairs" else OnDemandCorrelation)(
            fmap1, fmap2, self.radius, block_bytes)
        if not return_fmap1:
            del fmap1
        del fmap2
        context = parts.get("context_encoder", self.context_encoder)(image1)
        del image1
        hidden, context = torch.split(context, [self.hidden, context.shape[1] - self.hidden], dim=1)
        hidden, context = torch.tanh(hidden), F.relu(context)
        b, _, fh, fw = context.shape
        ys, xs = torch.meshgrid(torch.arange(fh, device=context.device, dtype=torch.float32),
                                torch.arange(fw, device=context.device, dtype=torch.float32), indexing="ij")
        coords0 = torch.stack([xs, ys])[None].expand(b, -1, -1, -1)
        coords1 = coords0.clone()
        for _ in range(num_flow_updates):
            corr_features = lookup(coords1).to(context.dtype)
            hidden, delta = update(hidden, context, corr_features, (coords1 - coords0).to(context.dtype))
            del corr_features
            coords1 = coords1 + delta.to(torch.float32)
        del lookup, context
        # Only the last iteration's flow is upsampled: the intermediate ones are not part of the result.
        flow = self.upsample((coords1 - coords0).to(hidden.dtype), hidden, (h, w), block_bytes)
        return (flow, fmap1) if return_fmap1 else flow

    def upsample(self, flow, hidden, size=None, block_bytes: int = 256 << 20):
        """Flow at 1/8 resolution -> (B, 2, 8h, 8w) cropped to ``size``: convex combination of the 3x3
        neighbourhood (RAFT-large) or bilinear (RAFT-small), in bands of rows to bound the mask's memory."""
        b, c, h, w = flow.shape
        out_h, out_w = size or (8 * h, 8 * w)
        if self.mask_predictor is None:
            up = F.interpolate(flow, size=(h * 8, w * 8), mode="bilinear", align_corners=True)
            return up[..., :out_h, :out_w].mul(8).contiguous()
        out = flow.new_empty(b, c, out_h, out_w)
        # per 1/8-resolution row: the 576-channel mask, its softmax and the 2x9x64 products
        per_row = b * w * (9 * 64) * flow.element_size() * 5
        band = max(1, min(h, block_bytes // per_row))
        for start in range(0, -(-out_h // 8), band):
            stop = min(start + band, h)
            # one row of context on each side for the 3x3 convolution and the 3x3 neighbourhood; at the image
            # border the zero padding is the real one
            lo, hi = max(start - 1, 0), min(stop + 1, h)
            rows = stop - start
            mask = self.mask_predictor(hidden[:, :, lo:hi]).reshape(b, 1, 9, 8, 8, hi - lo, w)
            mask = mask[..., start - lo:start - lo + rows, :].softmax(dim=2)
            neighbours = F.unfold(8 * flow[:, :, lo:hi], kernel_size=3, padding=1).view(b, c, 9, 1, 1, hi - lo, w)
            neighbours = neighbours[..., start - lo:start - lo + rows, :]
            up = (mask * neighbours).sum(dim=2)  # (b, c, 8, 8, rows, w)
            up = up.permute(0, 1, 4, 2, 5, 3).reshape(b, c, rows * 8, w * 8)
            y0, y1 = start * 8, min(stop * 8, out_h)
            out[:, :, y0:y1] = up[:, :, :y1 - y0, :out_w]
        return out


def raft_large(operations=nn, device=None, dtype=None) -> RAFT:
    return RAFT("raft_large", operations, device, dtype)


def raft_small(operations=nn, device=None, dtype=None) -> RAFT:
    return RAFT("raft_small", operations, device, dtype)
