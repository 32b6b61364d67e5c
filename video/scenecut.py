"""Scene-cut detection on the low-resolution frames, so temporal guidance never crosses a cut."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.shared.errors import UserInputError

SCENE_CUT_SIZE = 64


class SceneCutDetector:
    """Flags a cut when consecutive LR frames differ a lot.

    Metric: mean absolute difference of the two frames in [0, 1] (RGB), after area-downscaling to at most 64 px
    on the long side, so noise, grain and small motion barely count. A cut is declared when it exceeds
    ``threshold``. 0.3 separates hard cuts from fast motion on typical footage; lower values (0.15-0.2) also
    catch cuts between similar-looking shots but may fire on flashes or very fast pans.
    """

    def __init__(self, threshold: float):
        if not 0 < threshold <= 1:
            raise UserInputError(f"scene-cut threshold must be in (0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.previous: torch.Tensor | None = None

    @staticmethod
    def thumbnail(frame: torch.Tensor) -> torch.Tensor:
        h, w = frame.shape[-2:]
        small = frame.reshape(-1, *frame.shape[-3:])[:1, :3].float().cpu()
        scale = SCENE_CUT_SIZE / max(h, w)
        if scale < 1:
            small = F.interpolate(small, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
        return small

    def __call__(self, frame: torch.Tensor) -> bool:
        small = self.thumbnail(frame)
        cut = self.previous is not None and self.previous.shape == small.shape and \
            float((small - self.previous).abs().mean()) > self.threshold
        self.previous = small
        return cut
