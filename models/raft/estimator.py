"""The optical-flow estimator Stream-DiffVSR uses: RAFT with its options (iterations, correlation, resolution)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .correlation import all_pairs_bytes, padded_size
from .network import RAFT


class FlowEstimator(nn.Module):
    """``estimator(image1, image2)`` -> (B, 2, H, W) float32 flow in pixels that backward-warps image2 onto
    image1 (``image1(p) ≈ image2(p + flow(p))``), for images in [-1, 1] of any size (torchvision's
    ``raft(image1, image2)[-1]``).

    corr: "auto" | "all_pairs" | "on_demand" (see ``models/raft.py``); downscale: 1 (official), 2 or 4 to
    compute the flow at reduced resolution (images resized with antialiasing) and upsample it bilinearly, its
    values scaled by the factor (faster, less memory, not the official flow).
    """

    def __init__(self, raft: RAFT, num_flow_updates: int = 12, corr: str = "auto", downscale: int = 1):
        super().__init__()
        if downscale not in (1, 2, 4):
            raise ValueError(f"downscale must be 1, 2 or 4, got {downscale}")
        if corr not in ("auto", "all_pairs", "on_demand"):
            raise ValueError(f"corr must be 'auto', 'all_pairs' or 'on_demand', got {corr!r}")
        if int(num_flow_updates) < 1:
            raise ValueError(f"num_flow_updates must be at least 1, got {num_flow_updates}")
        self.raft = raft.eval()
        self.num_flow_updates, self.corr, self.downscale = int(num_flow_updates), corr, int(downscale)

    @property
    def arch(self) -> str:
        return self.raft.arch

    def estimate_memory(self, h: int, w: int, batch: int = 1) -> int:
        """Rough peak bytes of one call on h x w images, beyond the weights. "auto" is counted as on-demand:
        it only takes the all-pairs volume when that fits in a quarter of what is free at call time."""
        h, w = padded_size(max(h // self.downscale, 1), max(w // self.downscale, 1))
        px = h * w * batch
        # feature encoder: about three 64-channel fp32 maps at half resolution; then fmap1, pooled fmap2,
        # context and the update block's maps at 1/8 resolution (a few dozen 256-channel-equivalents / 64)
        encoders = px // 4 * 64 * 4 * 3
        eighth = px // 64 * 4 * (256 * 10)
        corr = all_pairs_bytes(h, w, batch) if self.corr == "all_pairs" else (256 << 20)
        return int(max(encoders, eighth + corr) * 1.25)

    @torch.inference_mode()
    def forward(self, image1: torch.Tensor, image2: torch.Tensor, corr: str | None = None,
                parts=None) -> torch.Tensor:
        """``parts``: stand-ins for RAFT's parts (``RAFT.forward``), e.g. compiled ones."""
        return self._estimate(image1, image2, None, corr, False, parts)[0]

    @torch.inference_mode()
    def flow_and_features(self, image1: torch.Tensor, image2: torch.Tensor, features2=None,
                          corr: str | None = None, parts=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flow, features1)``: the flow as ``forward`` gives it, and image1's RAFT features. Passing those as
        ``features2`` when image1 comes back as the next pair's image2 (a video: frame i, then frame i+1 with
        frame i) saves encoding it again and gives the same flow."""
        return self._estimate(image1, image2, features2, corr, True, parts)

    def _estimate(self, image1, image2, features2, corr, want_features, parts=None):
        param = next(self.raft.parameters())
        image1 = image1.to(param.device, param.dtype)
        image2 = image2.to(param.device, param.dtype)
        h, w = image1.shape[-2:]
        if self.downscale > 1:
            size = (max(h // self.downscale, 1), max(w // self.downscale, 1))
            image1 = F.interpolate(image1, size=size, mode="bilinear", align_corners=False, antialias=True)
            if features2 is None:
                image2 = F.interpolate(image2, size=size, mode="bilinear", align_corners=False, antialias=True)
            else:  # only its size is used
                image2 = image1
        if features2 is not None:
            features2 = features2.to(param.device, param.dtype)
        extra = {} if parts is None else {"parts": parts}
        if want_features or features2 is not None:
            flow, features1 = self.raft(image1, image2, self.num_flow_updates, corr=corr or self.corr,
                                        fmap2=features2, return_fmap1=True, **extra)
        else:
            flow, features1 = self.raft(image1, image2, self.num_flow_updates, corr=corr or self.corr,
                                        **extra), None
        flow = flow.to(torch.float32)
        if self.downscale > 1:
            # per axis, the exact ratio (sizes that are not multiples of the factor are rounded down)
            scale = torch.tensor([w / flow.shape[-1], h / flow.shape[-2]], device=flow.device).view(1, 2, 1, 1)
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False) * scale
        return flow, features1
