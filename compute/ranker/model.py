"""The class-ranker network (torch), after the RELION 4 paper's Fig. 1.

Image branch: three CNN blocks on the 64x64 class image, each three 3x3 convolutions
with ReLU, the last one strided by 2 and doubling the channels
(1→16, 16→16, 16→32/2 | 32→32, 32→32, 32→64/2 | 64→64, 64→64, 64→128/2 → 128×8×8),
then one linear layer to ``image_dim`` values. Feature branch: the normalised feature
vector. Head: concatenation → fully connected → ReLU → fully connected → one score.

``mode`` builds the two baselines with the same head: ``"image"`` (no features) and
``"features"`` (no CNN).
"""

from __future__ import annotations

import torch
from torch import nn

from compute.ranker.features import IMAGE_SIZE, N_FEATURES

MODES = ("full", "image", "features")


def _block(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_mid, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c_mid, c_mid, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c_mid, c_out, 3, padding=1, stride=2), nn.ReLU(inplace=True),
    )


class RankerNet(nn.Module):
    """Score network. ``forward(images (B,1,64,64), features (B,F)) -> (B,)`` scores in (0, 1)."""

    def __init__(self, mode: str = "full", n_features: int = N_FEATURES, image_dim: int = 64,
                 hidden: int = 64) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.n_features = n_features
        self.image_dim = image_dim
        self.hidden = hidden
        use_img = mode in ("full", "image")
        use_feat = mode in ("full", "features")
        if use_img:
            self.cnn = nn.Sequential(_block(1, 16, 32), _block(32, 32, 64), _block(64, 64, 128))
            side = IMAGE_SIZE // 8
            self.img_fc = nn.Sequential(nn.Flatten(), nn.Linear(128 * side * side, image_dim),
                                        nn.ReLU(inplace=True))
        n_in = (image_dim if use_img else 0) + (n_features if use_feat else 0)
        self.head = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, 1))

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.mode in ("full", "image"):
            parts.append(self.img_fc(self.cnn(images)))
        if self.mode in ("full", "features"):
            parts.append(features)
        # a sigmoid lets junk classes reach 0 exactly (a linear output hovers around it)
        return torch.sigmoid(self.head(torch.cat(parts, dim=1)).squeeze(1))

    def config(self) -> dict:
        return {"mode": self.mode, "n_features": self.n_features, "image_dim": self.image_dim,
                "hidden": self.hidden}
