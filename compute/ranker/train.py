"""Training loop of the class ranker (arrays in, a trained network out; no files).

The command that makes the training data, trains and writes the shipped weights is
``python -m app.ranker_training`` (file I/O lives in the app layer); this module only
fits a :class:`compute.ranker.model.RankerNet` to arrays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from compute.ranker.model import RankerNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters. ``threads`` caps torch's CPU threads (the machine is shared)."""

    mode: str = "full"
    epochs: int = 25
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-3
    seed: int = 0
    threads: int = 1
    #: feature columns blanked (set to 0 = "unknown") for a random fraction of each batch,
    #: so the model copes with classifications that report no accuracies
    drop_columns: tuple[int, ...] = ()
    drop_prob: float = 0.0
    #: amplitude of the random anisotropic scale / shear applied to training images
    shape_jitter: float = 0.15
    #: keep the weights of the epoch with the lowest ``val`` MSE (early stopping on a dev
    #: split of *training* molecules; never on the held-aside validation molecules)
    select_best: bool = False


def _augment(img: torch.Tensor, gen: torch.Generator, shape_jitter: float) -> torch.Tensor:
    """Random in-plane rotation, flip and a mild random anisotropic scale/shear per image.

    A class average has no preferred orientation; the scale/shear jitter varies the
    molecule shapes so the network learns what a good class looks like rather than the few
    training molecules' outlines.
    """
    b = img.shape[0]
    ang = torch.rand(b, generator=gen) * (2 * torch.pi)
    cos, sin = torch.cos(ang), torch.sin(ang)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    j = shape_jitter
    sx = 1 + (torch.rand(b, generator=gen) * 2 - 1) * j
    sy = 1 + (torch.rand(b, generator=gen) * 2 - 1) * j
    sh = (torch.rand(b, generator=gen) * 2 - 1) * j
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    aff = torch.zeros(b, 2, 2)
    aff[:, 0, 0] = sx * flip
    aff[:, 0, 1] = sh
    aff[:, 1, 1] = sy
    theta = torch.zeros(b, 2, 3)
    theta[:, :, :2] = rot @ aff
    grid = torch.nn.functional.affine_grid(theta, list(img.shape), align_corners=False)
    return torch.nn.functional.grid_sample(img, grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False)


def predict(model: RankerNet, images: np.ndarray, features: np.ndarray, batch: int = 256,
            device: str = "cpu") -> np.ndarray:
    """Raw network outputs (not clipped) for ``images (N,64,64)`` and normalised ``features``."""
    model.eval()
    out = []
    with torch.no_grad():
        for b in range(0, len(images), batch):
            x = torch.as_tensor(images[b:b + batch], dtype=torch.float32, device=device)[:, None]
            f = torch.as_tensor(features[b:b + batch], dtype=torch.float32, device=device)
            out.append(model(x, f).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def fit(images: np.ndarray, features: np.ndarray, targets: np.ndarray, cfg: TrainConfig,
        val: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        weights: np.ndarray | None = None,
        on_epoch: Callable[[int, float, float | None], None] | None = None,
        init_state: dict | None = None) -> tuple[RankerNet, list[dict]]:
    """Fit a network by (weighted) MSE with AdamW and a one-cycle learning-rate schedule;
    images are augmented by :func:`_augment`.

    Parameters
    ----------
    images : (N, 64, 64) float32 standardised network images.
    features : (N, F) float32 normalised features.
    targets : (N,) scores in [0, 1].
    cfg : TrainConfig
    val : optional (images, features, targets) evaluated after every epoch.
    weights : optional per-sample loss weights.
    init_state : optional ``state_dict`` of a network of the same mode to start from
        (fine-tuning) instead of a random initialisation.

    Returns
    -------
    The trained model (in eval mode) and the per-epoch history
    (``epoch``, ``train_mse``, ``val_mse``, ``seconds``); with ``cfg.select_best`` the model
    has the weights of the best ``val`` epoch and the last entry is
    ``{"selected_epoch", "val_mse"}``.
    """
    torch.set_num_threads(max(1, int(cfg.threads)))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = RankerNet(mode=cfg.mode, n_features=features.shape[1])
    if init_state is not None:
        model.load_state_dict(init_state)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(targets)
    steps = cfg.epochs * max(1, int(np.ceil(n / cfg.batch_size)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps,
                                                pct_start=0.15)
    X = torch.as_tensor(images, dtype=torch.float32)[:, None]
    Fz = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(targets, dtype=torch.float32)
    w = torch.as_tensor(np.ones(n) if weights is None else weights, dtype=torch.float32)
    hist: list[dict] = []
    best: tuple[float, int, dict] | None = None
    t0 = time.monotonic()
    for ep in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        tot, cnt = 0.0, 0
        for b in range(0, n, cfg.batch_size):
            idx = perm[b:b + cfg.batch_size]
            xb = _augment(X[idx], gen, cfg.shape_jitter) if cfg.mode != "features" else X[idx]
            fb = Fz[idx]
            if cfg.drop_columns and cfg.drop_prob > 0:
                rows = torch.rand(len(idx), generator=gen) < cfg.drop_prob
                fb = fb.clone()
                fb[rows.nonzero(as_tuple=True)[0][:, None], list(cfg.drop_columns)] = 0.0
            pred = model(xb, fb)
            loss = (w[idx] * (pred - y[idx]) ** 2).sum() / w[idx].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
        vm = None
        if val is not None:
            p = np.clip(predict(model, val[0], val[1]), 0, 1)
            vm = float(np.mean((p - val[2]) ** 2))
        hist.append({"epoch": ep + 1, "train_mse": tot / max(cnt, 1), "val_mse": vm,
                     "seconds": time.monotonic() - t0})
        if cfg.select_best and vm is not None and (best is None or vm < best[0]):
            best = (vm, ep + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        log.info("%s epoch %d/%d train MSE %.4f val MSE %s (%.0f s)", cfg.mode, ep + 1,
                 cfg.epochs, tot / max(cnt, 1), "-" if vm is None else f"{vm:.4f}",
                 time.monotonic() - t0)
        if on_epoch is not None:
            on_epoch(ep + 1, tot / max(cnt, 1), vm)
    if best is not None:
        model.load_state_dict(best[2])
        hist.append({"selected_epoch": best[1], "val_mse": best[0]})
        log.info("%s: kept epoch %d (val MSE %.4f)", cfg.mode, best[1], best[0])
    model.eval()
    return model, hist
