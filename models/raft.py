"""RAFT optical flow (large and small) with torchvision-compatible state-dict keys, and a correlation
lookup that never builds the all-pairs volume.

RAFT's all-pairs correlation takes 4·(HW/64)² bytes in fp32: 0.8 GiB for a 1280x720 frame, 63 GiB at
3840x2160. Stream-DiffVSR computes flow at the output resolution, so that volume is what runs users out of
memory. Average-pooling the volume over the second image's positions equals correlating with average-pooled
features of the second image, and bilinear lookup commutes with the dot product, so the same numbers can be
computed on demand at each iteration from the (small) feature pyramids. ``corr="all_pairs"`` keeps the
original path (faster when it fits); ``"auto"`` picks one from the volume size and the free memory.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn


def _conv_norm_act(cin, cout, kernel, stride=1, norm=None, act=True, operations=nn, device=None, dtype=None):
    # torchvision's Conv2dNormActivation: an nn.Sequential whose indices are the state-dict keys.
    layers = [operations.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, device=device,
                                dtype=dtype)]
    if norm == "instance":
        layers.append(nn.InstanceNorm2d(cout))
    elif norm == "batch":
        layers.append(nn.BatchNorm2d(cout, device=device, dtype=dtype))
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    def __init__(self, cin, cout, norm, stride, ops, device, dtype):
        super().__init__()
        kw = dict(operations=ops, device=device, dtype=dtype)
        self.convnormrelu1 = _conv_norm_act(cin, cout, 3, stride, norm, **kw)
        self.convnormrelu2 = _conv_norm_act(cout, cout, 3, 1, norm, **kw)
        self.downsample = _conv_norm_act(cin, cout, 1, stride, norm, act=False, **kw) if stride != 1 else None

    def forward(self, x):
        y = self.convnormrelu2(self.convnormrelu1(x))
        return F.relu((x if self.downsample is None else self.downsample(x)) + y)


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
        return F.relu((x if self.downsample is None else self.downsample(x)) + y)


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
NUM_LEVELS = 4
# Inputs are padded to this multiple, and to at least 8 * 2 * 2**(levels-1) = 128 px, the smallest size whose
# coarsest correlation level still has 2x2 cells.
PAD_MULTIPLE = 8
MIN_SIZE = 8 * 2 * 2 ** (NUM_LEVELS - 1)


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated now on ``device`` (free VRAM, or MemAvailable on the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def all_pairs_bytes(h: int, w: int, element_size: int = 4) -> int:
    """Peak bytes of the all-pairs correlation for an h x w input: the volume, its scaled copy and the pyramid."""
    n = (h // 8) * (w // 8)
    return int(element_size * n * n * (2 + 1 / 3))


class RAFT(nn.Module):
    """``forward(image1, image2)`` returns the final (B, 2, H, W) flow that backward-warps image2 onto image1.

    Images are in [-1, 1]. Any size works: inputs are padded (edge replicate) to a multiple of 8 and at least
    128 px, and the flow is cropped back. ``corr``: "all_pairs", "on_demand" or "auto".
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
        if image1.shape != image2.shape:
            raise ValueError(f"images must have the same shape, got {tuple(image1.shape)} and {tuple(image2.shape)}")
        h, w = image1.shape[-2:]
        ph = max(-(-h // PAD_MULTIPLE) * PAD_MULTIPLE, MIN_SIZE) - h
        pw = max(-(-w // PAD_MULTIPLE) * PAD_MULTIPLE, MIN_SIZE) - w
        if ph or pw:
            image1 = F.pad(image1, (0, pw, 0, ph), mode="replicate")
            image2 = F.pad(image2, (0, pw, 0, ph), mode="replicate")
        if corr == "auto":
            need = all_pairs_bytes(*image1.shape[-2:]) * image1.shape[0]
            corr = "all_pairs" if need <= available_memory(image1.device) // 4 else "on_demand"
        if corr not in ("all_pairs", "on_demand"):
            raise ValueError(f"corr must be 'auto', 'all_pairs' or 'on_demand', got {corr!r}")
        # Instance norm is per image, so encoding the two images separately gives the same features with half
        # the peak memory of the batched call.
        fmap1 = self.feature_encoder(image1)
        fmap2 = self.feature_encoder(image2)
        lookup = (AllPairsCorrelation if corr == "all_pairs" else OnDemandCorrelation)(
            fmap1, fmap2, self.radius, block_bytes)
        del fmap1, fmap2
        context = self.context_encoder(image1)
        hidden, context = torch.split(context, [self.hidden, context.shape[1] - self.hidden], dim=1)
        hidden, context = torch.tanh(hidden), F.relu(context)
        b, _, fh, fw = context.shape
        ys, xs = torch.meshgrid(torch.arange(fh, device=context.device), torch.arange(fw, device=context.device),
                                indexing="ij")
        coords0 = torch.stack([xs, ys]).to(torch.float32)[None].expand(b, -1, -1, -1)
        coords1 = coords0.clone()
        for _ in range(num_flow_updates):
            corr_features = lookup(coords1)
            hidden, delta = self.update_block(hidden, context, corr_features, coords1 - coords0)
            coords1 = coords1 + delta
        # Only the last iteration's flow is upsampled: the intermediate ones are not used.
        flow = self.upsample(coords1 - coords0, hidden)
        return flow[..., :h, :w]

    def upsample(self, flow, hidden):
        b, c, h, w = flow.shape
        if self.mask_predictor is None:
            return 8 * F.interpolate(flow, size=(h * 8, w * 8), mode="bilinear", align_corners=True)
        mask = self.mask_predictor(hidden).view(b, 1, 9, 8, 8, h, w).softmax(dim=2)
        neighbours = F.unfold(8 * flow, kernel_size=3, padding=1).view(b, c, 9, 1, 1, h, w)
        out = (mask * neighbours).sum(dim=2)
        return out.permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * 8, w * 8)


def _offsets(radius: int, device) -> torch.Tensor:
    # (dy, dx) pairs in the order torchvision concatenates them: the first index runs over x, the second over y.
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
        volume = (volume / math.sqrt(c)).reshape(b * h * w, 1, h, w)
        self.pyramid = [volume]
        for _ in range(NUM_LEVELS - 1):
            volume = F.avg_pool2d(volume, 2, 2)
            self.pyramid.append(volume)

    def __call__(self, coords):
        b, h, w = self.shape
        centres = coords.permute(0, 2, 3, 1).reshape(b * h * w, 1, 1, 2)
        side = 2 * self.radius + 1
        delta = _offsets(self.radius, coords.device).view(1, side, side, 2)
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
    windows spread too far apart (motion boundaries) are computed pixel by pixel. Out-of-range positions read a
    zero row, as grid_sample's zero padding does. Temporaries stay below ``block_bytes``.
    """

    TILE = 8
    SLACK = 8  # spread beyond a tile's own extent that still goes through the matrix product

    def __init__(self, fmap1, fmap2, radius, block_bytes=256 << 20):
        b, c, h, w = fmap1.shape
        t = self.TILE
        self.radius, self.block_bytes, self.shape = radius, block_bytes, (b, c, h, w)
        self.hp, self.wp = -(-h // t) * t, -(-w // t) * t
        f1 = F.pad(fmap1 / math.sqrt(c), (0, self.wp - w, 0, self.hp - h))
        # (tiles, t*t, c): tile-major, pixels row-major inside a tile
        self.f1 = f1.view(b, c, self.hp // t, t, self.wp // t, t).permute(0, 2, 4, 3, 5, 1).reshape(-1, t * t, c)
        self.levels = []
        level = fmap2
        for i in range(NUM_LEVELS):
            if i:
                level = F.avg_pool2d(level, 2, 2)
            lh, lw = level.shape[-2:]
            rows = level.flatten(2).transpose(1, 2)  # (b, lh*lw, c)
            rows = torch.cat([rows, rows.new_zeros(b, 1, c)], dim=1).reshape(-1, c)  # each batch ends in a zero row
            self.levels.append((rows.contiguous(), lh, lw))

    def __call__(self, coords):
        b, c, h, w = self.shape
        t, r = self.TILE, self.radius
        win, side = 2 * r + 2, 2 * r + 1
        coords = F.pad(coords, (0, self.wp - w, 0, self.hp - h), mode="replicate")
        tiles = coords.view(b, 2, self.hp // t, t, self.wp // t, t).permute(0, 2, 4, 3, 5, 1).reshape(-1, t * t, 2)
        n_tiles = tiles.shape[0]
        tiles_per_batch = n_tiles // b
        batch_of_tile = torch.arange(n_tiles, device=coords.device) // tiles_per_batch
        out = torch.empty(n_tiles, t * t, NUM_LEVELS, side, side, device=coords.device, dtype=self.f1.dtype)
        shifts = torch.arange(-r, r + 2, device=coords.device)
        for li, (rows, lh, lw) in enumerate(self.levels):
            centre = tiles / 2**li
            base = torch.floor(centre)
            frac = centre - base
            base = base.long()
            lo = base.amin(dim=1) - r  # (tiles, 2) patch origin (x, y)
            spread = (base.amax(dim=1) - base.amin(dim=1)).amax(dim=1)
            # The patch covers the largest spread of any tile, up to a cap; wider tiles go pixel by pixel.
            size = int(min(int(spread.max()), t - 1 + self.SLACK)) + win
            fits = spread + win <= size
            grid = torch.arange(size, device=coords.device)
            chunk = max(1, self.block_bytes // (size * size * c * self.f1.element_size() * 2))
            zero_row = (batch_of_tile * (lh * lw + 1) + lh * lw)
            for start in range(0, n_tiles, chunk):
                stop = min(n_tiles, start + chunk)
                ox, oy = lo[start:stop, 0:1], lo[start:stop, 1:2]
                xs, ys = ox + grid, oy + grid  # (k, size)
                valid = ((ys >= 0) & (ys < lh))[:, :, None] & ((xs >= 0) & (xs < lw))[:, None, :]
                index = torch.where(valid, ys[:, :, None] * lw + xs[:, None, :]
                                    + (batch_of_tile[start:stop] * (lh * lw + 1))[:, None, None],
                                    zero_row[start:stop, None, None])
                patch = rows[index.reshape(-1)].view(stop - start, size * size, c)
                products = torch.bmm(self.f1[start:stop], patch.transpose(1, 2))  # (k, t*t, size*size)
                # position of each pixel's (2r+2)² window inside the patch
                px = (base[start:stop, :, 0] - ox)[..., None] + shifts  # (k, t*t, win)
                py = (base[start:stop, :, 1] - oy)[..., None] + shifts
                local = (py.clamp(0, size - 1)[..., :, None] * size + px.clamp(0, size - 1)[..., None, :])
                dots = torch.gather(products, 2, local.reshape(stop - start, t * t, win * win))
                dots = dots.view(stop - start, t * t, win, win)  # [..., y, x]
                out[start:stop, :, li] = self._blend(dots, frac[start:stop])
            if not bool(fits.all()):
                self._per_pixel(out, li, tiles, fits, rows, lh, lw, batch_of_tile)
        tb = self.hp // t, self.wp // t
        features = out.view(b, *tb, t, t, NUM_LEVELS * side * side).permute(0, 5, 1, 3, 2, 4)
        return features.reshape(b, -1, self.hp, self.wp)[..., :h, :w]

    @staticmethod
    def _blend(dots, frac):
        fx, fy = frac[..., 0, None, None], frac[..., 1, None, None]
        corr = ((1 - fx) * (1 - fy) * dots[..., :-1, :-1] + fx * (1 - fy) * dots[..., :-1, 1:]
                + (1 - fx) * fy * dots[..., 1:, :-1] + fx * fy * dots[..., 1:, 1:])  # (..., y, x)
        # torchvision orders the features with the x offset outer and the y offset inner.
        return corr.transpose(-1, -2)

    def _per_pixel(self, out, li, tiles, fits, rows, lh, lw, batch_of_tile):
        """Tiles whose windows spread too far: one gather and dot product per window position."""
        r = self.radius
        win = 2 * r + 2
        which = (~fits).nonzero().flatten()
        shifts = torch.arange(-r, r + 2, device=tiles.device)
        for start in range(0, which.numel(), 64):
            sel = which[start:start + 64]
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
                picked = rows[index.reshape(-1)].view(*index.shape, -1)  # (k, p, win, c)
                dots[..., j, :] = torch.einsum("kpc,kpxc->kpx", f1, picked)
            out[sel, :, li] = self._blend(dots, frac)


def raft_large(operations=nn, device=None, dtype=None) -> RAFT:
    return RAFT("raft_large", operations, device, dtype)


def raft_small(operations=nn, device=None, dtype=None) -> RAFT:
    return RAFT("raft_small", operations, device, dtype)
