"""RAFT's correlation lookup: the original all-pairs volume, and an on-demand lookup that computes the same
numbers without it.

RAFT's all-pairs correlation takes 4·(HW/64)² bytes in fp32: 0.8 GiB for a 1280x720 frame, 63 GiB at
3840x2160, 198 GiB at 5120x2880. Stream-DiffVSR computes flow at the output resolution, so that volume is what
runs users out of memory. Average-pooling the volume over the second image's positions equals correlating with
average-pooled features of the second image, and bilinear lookup commutes with the dot product, so the same
numbers can be computed on demand at each iteration from the (small) feature pyramid: ``corr="on_demand"``.
``corr="all_pairs"`` keeps the original path; ``"auto"`` picks one with ``select_correlation``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NUM_LEVELS = 4
# Inputs are padded to a multiple of 8 and to at least 8 * 2 * 2**(levels-1) = 128 px: the smallest size whose
# coarsest correlation level still has 2x2 cells (grid_sample's align_corners=True lookup divides by size - 1).
PAD_MULTIPLE = 8
MIN_SIZE = 8 * 2 * 2 ** (NUM_LEVELS - 1)
# "auto" takes the all-pairs volume only when it is at most this share of the memory it may use and at most this size.
AUTO_MEMORY_FRACTION = 0.25
AUTO_MAX_BYTES = 2 << 30


def padded_size(h: int, w: int) -> tuple[int, int]:
    """The size RAFT runs at for an h x w input (a multiple of 8, at least 128 px on each side)."""
    return (max(-(-h // PAD_MULTIPLE) * PAD_MULTIPLE, MIN_SIZE), max(-(-w // PAD_MULTIPLE) * PAD_MULTIPLE, MIN_SIZE))


def all_pairs_bytes(h: int, w: int, batch: int = 1, element_size: int = 4) -> int:
    """Bytes of the all-pairs correlation (level-0 volume and its 3 pooled levels) for an h x w input."""
    ph, pw = padded_size(h, w)
    n = (ph // 8) * (pw // 8)
    levels = sum(((ph // 8) >> i) * ((pw // 8) >> i) for i in range(NUM_LEVELS))
    return int(element_size * batch * n * levels)


def select_correlation(h: int, w: int, memory_bytes: int, batch: int = 1, element_size: int = 4) -> str:
    """The "auto" rule: "all_pairs" when the all-pairs volume (with its pyramid) takes at most a quarter of
    ``memory_bytes`` and at most 2 GiB, else "on_demand".

    The quarter leaves room for the models, the encoders and the update block; the 2 GiB cap (a 1600x900 frame)
    is where the on-demand lookup stops being slower on the CPU (see bench/bench_raft_corr.py), so the volume's
    memory buys nothing beyond it.
    """
    need = all_pairs_bytes(h, w, batch, element_size)
    return "all_pairs" if need <= min(memory_bytes * AUTO_MEMORY_FRACTION, AUTO_MAX_BYTES) else "on_demand"


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
