"""MRC images and particle stacks through :mod:`mrcfile`, with RELION conventions.

- micrographs and particles are written as float16 (MRC mode 12, as RELION 4 does) or float32;
- :class:`StackReader` reads particles named ``N@stack.mrcs`` from memory-mapped stacks, keeping
  a bounded number of files open, so 100,000+ particles never need to fit in memory.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import mrcfile
import numpy as np

from metadata.errors import MetadataError
from metadata.star import resolve_path, split_image_name


def write_mrc(path: str | Path, data: np.ndarray, pixel_size_a: float | None = None,
              float16: bool = False, is_stack: bool | None = None) -> Path:
    """Write an image, stack or volume atomically. ``float16`` writes MRC mode 12."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(data)
    arr = arr.astype(np.float16 if float16 else np.float32, copy=False)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with mrcfile.new(tmp, overwrite=True) as m:
        m.set_data(arr)
        if is_stack if is_stack is not None else (p.suffix == ".mrcs" and arr.ndim == 3):
            m.set_image_stack()
        if pixel_size_a is not None:
            m.voxel_size = float(pixel_size_a)
        m.update_header_stats()
    os.replace(tmp, p)
    return p


def read_mrc(path: str | Path, as_float32: bool = True) -> tuple[np.ndarray, float | None]:
    """Read a whole MRC file; returns (data, pixel size in A or None when the header has 0)."""
    p = Path(path)
    try:
        with mrcfile.open(p, permissive=True) as m:
            if m.data is None:
                raise MetadataError("MRC file has no data (truncated?)", p)
            data = np.array(m.data, dtype=np.float32 if as_float32 else m.data.dtype)
            px = float(m.voxel_size.x)
    except FileNotFoundError:
        raise MetadataError("file not found", p) from None
    except (ValueError, OSError) as exc:
        raise MetadataError(f"not a readable MRC file ({exc})", p) from None
    return data, (px if px > 0 else None)


def mrc_pixel_size(path: str | Path) -> float | None:
    """Pixel size from the header only (``None`` when unset)."""
    try:
        with mrcfile.open(Path(path), header_only=True, permissive=True) as m:
            px = float(m.voxel_size.x)
    except (ValueError, OSError) as exc:
        raise MetadataError(f"not a readable MRC file ({exc})", path) from None
    return px if px > 0 else None


class StackReader:
    """Random access to particles named ``N@stack`` through memory maps (LRU of open files).

    Parameters
    ----------
    star_path, project_dir
        Used to resolve relative stack paths (project directory first, as RELION does).
    max_open
        How many stacks stay mapped at once.
    """

    def __init__(self, star_path: str | Path | None = None, project_dir: str | Path | None = None,
                 max_open: int = 64) -> None:
        self.star_path = star_path
        self.project_dir = project_dir
        self.max_open = max_open
        self._open: OrderedDict[str, mrcfile.mrcmemmap.MrcMemmap] = OrderedDict()

    def _stack(self, name: str):
        m = self._open.get(name)
        if m is not None:
            self._open.move_to_end(name)
            return m
        path = resolve_path(name, self.star_path, self.project_dir)
        try:
            m = mrcfile.mmap(path, mode="r", permissive=True)
        except FileNotFoundError:
            raise MetadataError("particle stack not found", path) from None
        except (ValueError, OSError) as exc:
            raise MetadataError(f"not a readable MRC stack ({exc})", path) from None
        if m.data is None:
            m.close()
            raise MetadataError("MRC stack has no data (truncated?)", path)
        self._open[name] = m
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return m

    def read(self, image_names: Sequence[str], dtype=np.float32) -> np.ndarray:
        """Images for ``image_names`` as one (N, y, x) array, grouped by stack for speed."""
        parsed = [split_image_name(n) for n in image_names]
        if not parsed:
            return np.zeros((0, 0, 0), dtype=dtype)
        out: np.ndarray | None = None
        by_stack: dict[str, list[tuple[int, int]]] = {}
        for pos, (idx, f) in enumerate(parsed):
            by_stack.setdefault(f, []).append((pos, idx))
        for f, items in by_stack.items():
            data = self._stack(f).data
            if data.ndim == 2:
                data = data[None]
            if out is None:
                out = np.empty((len(parsed), *data.shape[-2:]), dtype=dtype)
            pos = np.array([p for p, _ in items])
            idx = np.array([i for _, i in items])
            if idx.max() >= data.shape[0] or idx.min() < 0:
                raise MetadataError(f"image {idx.max() + 1} requested but the stack holds "
                                    f"{data.shape[0]}", f)
            if data.shape[-2:] != out.shape[-2:]:
                raise MetadataError(f"image size {data.shape[-2:]} differs from "
                                    f"{out.shape[-2:]}", f)
            order = np.argsort(idx)
            out[pos[order]] = data[idx[order]]
        return out  # type: ignore[return-value]

    def close(self) -> None:
        for m in self._open.values():
            m.close()
        self._open.clear()

    def __enter__(self) -> StackReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
