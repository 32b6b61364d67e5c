"""RAFT optical flow (large and small) with torchvision-compatible state-dict keys, and a correlation
lookup that never builds the all-pairs volume.

RAFT's all-pairs correlation takes 4·(HW/64)² bytes in fp32: 0.8 GiB for a 1280x720 frame, 63 GiB at
3840x2160, 198 GiB at 5120x2880. Stream-DiffVSR computes flow at the output resolution, so that volume is what
runs users out of memory. Average-pooling the volume over the second image's positions equals correlating with
average-pooled features of the second image, and bilinear lookup commutes with the dot product, so the same
numbers can be computed on demand at each iteration from the (small) feature pyramid: ``corr="on_demand"``.
``corr="all_pairs"`` keeps the original path; ``"auto"`` picks one with ``select_correlation``.

The rest of the network is written to keep a 5120x2880 pair within a few GiB on the CPU: the two images go
through the feature encoder one at a time (instance norm is per image, so this changes nothing), norms and
residual additions work in place when no gradient is needed, encoders run channels-last on the CPU (oneDNN
then needs no reordered copies of 1 GB activations), and the final convex upsampling runs in bands of rows.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

NUM_LEVELS = 4
# Inputs are padded to a multiple of 8 and to at least 8 * 2 * 2**(levels-1) = 128 px: the smallest size whose
# coarsest correlation level still has 2x2 cells (grid_sample's align_corners=True lookup divides by size - 1).
PAD_MULTIPLE = 8
MIN_SIZE = 8 * 2 * 2 ** (NUM_LEVELS - 1)
# "auto" takes the all-pairs volume only when it is at most this share of the free memory and at most this size.
AUTO_FREE_FRACTION = 0.25
AUTO_MAX_BYTES = 2 << 30


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


def available_memory(device) -> int:
    """Bytes that can be allocated now on ``device``: free VRAM on CUDA; on other devices the system's
    MemAvailable (/proc/meminfo, else sysconf), capped by a cgroup v2 memory limit when there is one."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 8 << 30
    try:  # containers: /proc/meminfo shows the host, the cgroup holds the real limit
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                free = min(free, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    return max(int(free), 0)


def padded_size(h: int, w: int) -> tuple[int, int]:
    """The size RAFT runs at for an h x w input (a multiple of 8, at least 128 px on each side)."""
    return (max(-(-h // PAD_MULTIPLE) * PAD_MULTIPLE, MIN_SIZE), max(-(-w // PAD_MULTIPLE) * PAD_MULTIPLE, MIN_SIZE))


def all_pairs_bytes(h: int, w: int, batch: int = 1, element_size: int = 4) -> int:
    """Bytes of the all-pairs correlation (level-0 volume and its 3 pooled levels) for an h x w input."""
    ph, pw = padded_size(h, w)
    n = (ph // 8) * (pw // 8)
    levels = sum(((ph // 8) >> i) * ((pw // 8) >> i) for i in range(NUM_LEVELS))
    return int(element_size * batch * n * levels)


def select_correlation(h: int, w: int, free_bytes: int, batch: int = 1, element_size: int = 4) -> str:
    """The "auto" rule: "all_pairs" when the all-pairs volume (with its pyramid) takes at most a quarter of
    ``free_bytes`` and at most 2 GiB, else "on_demand".

    The quarter leaves room for the encoders and the update block; the 2 GiB cap (a 1600x900 frame) is where
    the on-demand lookup stops being slower on the CPU (see bench/bench_raft_corr.py), so the volume's memory buys
    nothing beyond it.
    """
    need = all_pairs_bytes(h, w, batch, element_size)
    return "all_pairs" if need <= min(free_bytes * AUTO_FREE_FRACTION, AUTO_MAX_BYTES) else "on_demand"


class RAFT(nn.Module):
    """``forward(image1, image2)`` returns the final (B, 2, H, W) flow that backward-warps image2 onto image1.

    Images are in [-1, 1]. Any size works: inputs are padded (edge replicate) to a multiple of 8 and at least
    128 px, and the flow is cropped back. ``corr``: "all_pairs", "on_demand" or "auto" (``select_correlation``
    with the free memory of the images' device). ``block_bytes`` bounds the on-demand lookup's and the
    upsampling's temporaries.
    """

    def __init__(self, arch: str = "raft_large", operations=nn, device=None, dtype=None):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown RAFT architecture {arch!r} (use one of {sorted(ARCHS)})")
        (block, f_layers, c_layers, c_norm, radius, corr_layers, flow_layers, motion_out, hidden, kernels, pads,
         head_hidden, use_mask) = ARCHS[arch]
        self.arch, self.radius, self.hidden = arch, radius, hidden
        self.feature_encoder = FeatureEncoder(block, f_layers, "instance", operations, device, dtype)
        self.context_encoder = FeatureEncoder(block, c_layers, c_norm, operations, device, dtype)
        corr_ch = NUM_LEVELS * (2 * radius + 1) ** 2
        motion = MotionEncoder(corr_ch, corr_layers, flow_layers, motion_out, operations, device, dtype)
        recurrent = RecurrentBlock(motion_out + c_layers[-1] - hidden, hidden, kernels, pads, operations, device,
                                   dtype)
        self.update_block = UpdateBlock(motion, recurrent, FlowHead(hidden, head_hidden, operations, device, dtype))
        self.mask_predictor = MaskPredictor(hidden, 256, operations, device, dtype) if use_mask else None

    def forward(self, image1, image2, num_flow_updates: int = 12, corr: str = "auto",
                block_bytes: int = 256 << 20):
        if image1.shape != image2.shape or image1.ndim != 4 or image1.shape[1] != 3:
            raise ValueError(f"images must both be (B, 3, H, W), got {tuple(image1.shape)} and "
                             f"{tuple(image2.shape)}")
        if corr == "auto":
            corr = select_correlation(*image1.shape[-2:], available_memory(image1.device), image1.shape[0],
                                      image1.element_size())
        if corr not in ("all_pairs", "on_demand"):
            raise ValueError(f"corr must be 'auto', 'all_pairs' or 'on_demand', got {corr!r}")
        h, w = image1.shape[-2:]
        ph, pw = padded_size(h, w)
        if (ph, pw) != (h, w):
            image1 = F.pad(image1, (0, pw - w, 0, ph - h), mode="replicate")
            image2 = F.pad(image2, (0, pw - w, 0, ph - h), mode="replicate")
        # Instance norm is per image: encoding the images one at a time gives the features of torchvision's
        # batched call with half the peak memory.
        fmap1 = self.feature_encoder(image1)
        fmap2 = self.feature_encoder(image2)
        del image2
        lookup = (AllPairsCorrelation if corr == "all_pairs" else OnDemandCorrelation)(
            fmap1, fmap2, self.radius, block_bytes)
        del fmap1, fmap2
        context = self.context_encoder(image1)
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
            hidden, delta = self.update_block(hidden, context, corr_features, (coords1 - coords0).to(context.dtype))
            del corr_features
            coords1 = coords1 + delta.to(torch.float32)
        del lookup, context
        # Only the last iteration's flow is upsampled: the intermediate ones are not part of the result.
        return self.upsample((coords1 - coords0).to(hidden.dtype), hidden, (h, w), block_bytes)

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


def _offsets(radius: int, device) -> torch.Tensor:
    # torchvision's order: the first index runs over the x offset, the second over the y offset.
    d = torch.linspace(-radius, radius, 2 * radius + 1, device=device)
    grid = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1)  # [..., 0] added to x, [..., 1] to y
    return grid.reshape(-1, 2)


def _normalise(coords_xy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    x, y = coords_xy[..., :1], coords_xy[..., 1:]
    return torch.cat([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], dim=-1)


class AllPairsCorrelation:
    """The original RAFT lookup: build the all-pairs volume and its pyramid once, index it every iteration."""

    def __init__(self, fmap1, fmap2, radius, block_bytes=None):
        b, c, h, w = fmap1.shape
        self.radius, self.shape = radius, (b, h, w)
        volume = torch.matmul(fmap1.reshape(b, c, h * w).transpose(1, 2), fmap2.reshape(b, c, h * w))
        volume = volume.div_(math.sqrt(c)).reshape(b * h * w, 1, h, w)
        self.pyramid = [volume]
        for _ in range(NUM_LEVELS - 1):
            volume = F.avg_pool2d(volume, 2, 2)
            self.pyramid.append(volume)

    def __call__(self, coords):
        b, h, w = self.shape
        centres = coords.permute(0, 2, 3, 1).reshape(b * h * w, 1, 1, 2).to(self.pyramid[0].dtype)
        side = 2 * self.radius + 1
        delta = _offsets(self.radius, coords.device).view(1, side, side, 2).to(centres.dtype)
        out = []
        for level, volume in enumerate(self.pyramid):
            grid = _normalise(centres / 2**level + delta, *volume.shape[-2:])
            out.append(F.grid_sample(volume, grid, mode="bilinear", align_corners=True).view(b, h, w, -1))
        return torch.cat(out, dim=-1).permute(0, 3, 1, 2).contiguous()


class OnDemandCorrelation:
    """Same features as ``AllPairsCorrelation`` without the volume.

    Per level, fmap2 is average-pooled like the volume would be. A lookup at centre c with offsets d samples
    bilinearly at c + d; all offsets share the fractional part of c, so what is needed are the dot products of
    fmap1 with fmap2 at the (2r+2)² integer positions around floor(c), blended with four bilinear weights.
    Neighbouring pixels need overlapping windows, so pixels are taken in 8x8 tiles: one matrix product of the
    tile's features with the fmap2 patch covering all their windows gives every dot product at once. Tiles whose
    windows spread further apart (motion boundaries) take a larger patch, and beyond that go pixel by pixel.
    Out-of-range positions read a zero row, as grid_sample's zero padding does. Temporaries stay below
    ``block_bytes``; what stays resident is fmap1 and the pooled fmap2 (about 2.4x one feature map).
    """

    TILE = 8
    # extra spread (beyond a tile's own 7 px) that the normal and the wide patch accept
    SLACK = (4, 24)

    def __init__(self, fmap1, fmap2, radius, block_bytes=256 << 20):
        b, c, h, w = fmap1.shape
        t = self.TILE
        self.radius, self.block_bytes, self.shape = radius, block_bytes, (b, c, h, w)
        self.hp, self.wp = -(-h // t) * t, -(-w // t) * t
        f1 = F.pad(fmap1, (0, self.wp - w, 0, self.hp - h))
        # (tiles, t*t, c): tile-major, pixels row-major inside a tile
        f1 = f1.view(b, c, self.hp // t, t, self.wp // t, t).permute(0, 2, 4, 3, 5, 1).reshape(-1, t * t, c)
        self.f1 = f1 / math.sqrt(c)  # not in place: the reshape may be a view of the caller's fmap1
        self.levels = []
        level = fmap2
        for i in range(NUM_LEVELS):
            if i:
                level = F.avg_pool2d(level, 2, 2)
            lh, lw = level.shape[-2:]
            rows = level.permute(0, 2, 3, 1).reshape(b, lh * lw, c)
            rows = torch.cat([rows, rows.new_zeros(b, 1, c)], dim=1).reshape(-1, c)  # each batch ends in a zero row
            self.levels.append((rows, lh, lw))

    def __call__(self, coords):
        b, c, h, w = self.shape
        t, r = self.TILE, self.radius
        win, side = 2 * r + 2, 2 * r + 1
        coords = F.pad(coords.to(torch.float32), (0, self.wp - w, 0, self.hp - h), mode="replicate")
        tiles = coords.view(b, 2, self.hp // t, t, self.wp // t, t).permute(0, 2, 4, 3, 5, 1).reshape(-1, t * t, 2)
        n_tiles = tiles.shape[0]
        batch_of_tile = torch.arange(n_tiles, device=coords.device) // (n_tiles // b)
        out = torch.empty(n_tiles, t * t, NUM_LEVELS, side, side, device=coords.device, dtype=self.f1.dtype)
        for li, (rows, lh, lw) in enumerate(self.levels):
            centre = tiles / 2**li
            base = torch.floor(centre)
            frac = centre - base
            base = base.long()
            spread = (base.amax(dim=1) - base.amin(dim=1)).amax(dim=1)  # (tiles,)
            level = (rows, lh, lw, li)
            todo = torch.ones(n_tiles, dtype=torch.bool, device=coords.device)
            for slack in self.SLACK:
                fits = todo & (spread <= t - 1 + slack)
                if not bool(fits.any()):
                    continue
                which = fits.nonzero().flatten()
                size = int(spread[which].max()) + win
                self._patches(out, which, size, base, frac, batch_of_tile, level)
                todo &= ~fits
            if bool(todo.any()):
                self._per_pixel(out, todo.nonzero().flatten(), tiles, batch_of_tile, level)
        features = out.view(b, self.hp // t, self.wp // t, t, t, -1).permute(0, 5, 1, 3, 2, 4)
        return features.reshape(b, -1, self.hp, self.wp)[..., :h, :w]

    def _patches(self, out, which, size, base, frac, batch_of_tile, level):
        """Tiles ``which``: one size x size patch of the level per tile, one batched matrix product."""
        rows, lh, lw, li = level
        c, t, r = self.shape[1], self.TILE, self.radius
        win = 2 * r + 2
        grid = torch.arange(size, device=base.device)
        shifts = torch.arange(-r, r + 2, device=base.device)
        per_tile = (size * size * c + t * t * size * size + size * size * 2) * self.f1.element_size()
        chunk = max(1, self.block_bytes // per_tile)
        for start in range(0, which.numel(), chunk):
            sel = which[start:start + chunk]
            k = sel.numel()
            tb = base[sel]  # (k, t*t, 2)
            origin = tb.amin(dim=1) - r  # (k, 2): the patch's top-left corner (x, y)
            xs, ys = origin[:, 0:1] + grid, origin[:, 1:2] + grid  # (k, size)
            valid = ((ys >= 0) & (ys < lh))[:, :, None] & ((xs >= 0) & (xs < lw))[:, None, :]
            offset = (batch_of_tile[sel] * (lh * lw + 1))[:, None, None]
            index = torch.where(valid, ys[:, :, None] * lw + xs[:, None, :] + offset, offset + lh * lw)
            patch = rows[index.reshape(-1)].view(k, size * size, c)
            products = torch.bmm(self.f1[sel], patch.transpose(1, 2))  # (k, t*t, size*size)
            del patch
            # each pixel's (2r+2)² window inside the patch
            px = (tb[..., 0] - origin[:, None, 0])[..., None] + shifts  # (k, t*t, win)
            py = (tb[..., 1] - origin[:, None, 1])[..., None] + shifts
            local = (py[..., :, None] * size + px[..., None, :]).reshape(k, t * t, win * win)
            dots = torch.gather(products, 2, local).view(k, t * t, win, win)  # [..., y, x]
            out[sel, :, li] = self._blend(dots, frac[sel])

    def _per_pixel(self, out, which, tiles, batch_of_tile, level):
        """Tiles whose windows spread too far: one gather and dot product per window row."""
        rows, lh, lw, li = level
        c, t, r = self.shape[1], self.TILE, self.radius
        win = 2 * r + 2
        shifts = torch.arange(-r, r + 2, device=tiles.device)
        chunk = max(1, self.block_bytes // (t * t * win * c * self.f1.element_size() * 2))
        for start in range(0, which.numel(), chunk):
            sel = which[start:start + chunk]
            centre = tiles[sel] / 2**li
            base = torch.floor(centre)
            frac = centre - base
            base = base.long()
            xs = base[..., 0, None] + shifts  # (k, p, win)
            ys = base[..., 1, None] + shifts
            offset = (batch_of_tile[sel] * (lh * lw + 1))[:, None, None]
            f1 = self.f1[sel]  # (k, p, c)
            dots = torch.empty(*f1.shape[:2], win, win, device=tiles.device, dtype=f1.dtype)
            for j in range(win):
                y = ys[..., j:j + 1]
                ok = (y >= 0) & (y < lh) & (xs >= 0) & (xs < lw)
                index = torch.where(ok, y * lw + xs + offset, offset + lh * lw)  # (k, p, win)
                picked = rows[index.reshape(-1)].view(*index.shape, c)  # (k, p, win, c)
                dots[..., j, :] = torch.einsum("kpc,kpxc->kpx", f1, picked)
            out[sel, :, li] = self._blend(dots, frac)

    @staticmethod
    def _blend(dots, frac):
        fx, fy = frac[..., 0, None, None].to(dots.dtype), frac[..., 1, None, None].to(dots.dtype)
        corr = ((1 - fx) * (1 - fy) * dots[..., :-1, :-1] + fx * (1 - fy) * dots[..., :-1, 1:]
                + (1 - fx) * fy * dots[..., 1:, :-1] + fx * fy * dots[..., 1:, 1:])  # (..., y, x)
        # torchvision orders the features with the x offset outer and the y offset inner.
        return corr.transpose(-1, -2)


def raft_large(operations=nn, device=None, dtype=None) -> RAFT:
    return RAFT("raft_large", operations, device, dtype)


def raft_small(operations=nn, device=None, dtype=None) -> RAFT:
    return RAFT("raft_small", operations, device, dtype)
