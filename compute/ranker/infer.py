"""Class-ranker inference: class averages + metadata of one job -> scores on a 0–1 scale.

CPU by default; the GPU when :func:`compute.backend.select_device` picks it (``auto``
with a usable GPU, or ``SCOPESIDE_DEVICE=gpu``) and torch sees CUDA.
The checkpoint is a plain dict (the app layer loads it from ``resources/ranker``):
``{"config": RankerNet.config(), "state_dict": ..., "feature_stats": FeatureStats.to_dict()}``
and ``"preprocess": {"recentre": bool, "relative_intensity": bool}`` (network images
recentred by :func:`compute.ranker.features.recentre_images`; intensity features divided
by the job's scale, :func:`compute.ranker.features.relative_intensity`; absent = False,
as for the older checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from compute import backend
from compute.errors import ComputeError
from compute.ranker.features import (
    PREPROCESS_KEY,
    ClassMeta,
    FeatureStats,
    job_features,
    network_images,
    normalise_features,
)
from compute.ranker.model import RankerNet

UNSCORED = -999.0


@dataclass
class RankScores:
    """Scores of one job. ``scores[k]`` is in [0, 1], or ``UNSCORED`` (-999) when not scored."""

    scores: np.ndarray
    scored: np.ndarray
    features_raw: np.ndarray
    features_norm: np.ndarray


def torch_device(device: str | None = None) -> str:
    """``"cuda"`` when the backend picks the GPU and torch can use it, else ``"cpu"``."""
    if backend.select_device(device) == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


class ClassRanker:
    """A loaded ranker network plus its feature normalisation."""

    def __init__(self, checkpoint: dict, device: str | None = None) -> None:
        try:
            cfg = dict(checkpoint["config"])
            self.stats = FeatureStats.from_dict(checkpoint["feature_stats"])
            self.model = RankerNet(**cfg)
            self.model.load_state_dict(checkpoint["state_dict"])
            pre = dict(checkpoint.get(PREPROCESS_KEY) or {})
            self.recentre = bool(pre.get("recentre", False))
            self.relative_intensity = bool(pre.get("relative_intensity", False))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ComputeError(f"not a scopeside class-ranker checkpoint ({exc})") from None
        self.device = torch_device(device)
        self.model.to(self.device).eval()
        self.info = dict(checkpoint.get("info", {}))

    def score(self, images: np.ndarray, metas: list[ClassMeta], pixel_size_a: float,
              diameter_a: float, batch: int = 32) -> RankScores:
        """Score every class of one job.

        Parameters
        ----------
        images : (K, n, n) class averages (protein white).
        metas : K :class:`ClassMeta` (particle counts, accuracies, resolution; ``None`` = unknown).
        pixel_size_a, diameter_a : pixel size of the images and particle diameter, Å.
        """
        if pixel_size_a is None or not pixel_size_a > 0:
            raise ComputeError(f"class ranker needs a positive pixel size, got {pixel_size_a}")
        if diameter_a is None or not diameter_a > 0:
            raise ComputeError(f"class ranker needs a positive particle diameter, got {diameter_a}")
        X, scored = job_features(images, metas, pixel_size_a, diameter_a,
                                 relative=self.relative_intensity)
        Z = normalise_features(X, self.stats)
        scores = np.full(len(metas), UNSCORED)
        idx = np.flatnonzero(scored)
        if idx.size:
            net = network_images(np.asarray(images)[idx], pixel_size_a, diameter_a,
                                 recentre=self.recentre)
            out = []
            with torch.inference_mode():  # small batches stay in cache: ~2x faster on CPU
                for b in range(0, idx.size, batch):
                    x = torch.as_tensor(net[b:b + batch], device=self.device)[:, None]
                    f = torch.as_tensor(Z[idx[b:b + batch]], device=self.device)
                    out.append(self.model(x, f).cpu().numpy())
            scores[idx] = np.clip(np.concatenate(out), 0.0, 1.0)
        return RankScores(scores, scored, X, Z)
