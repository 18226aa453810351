"""Movie frames and detector references as pixels: MRC, TIFF (incl. LZW) and EER via tifffile.

- :func:`open_movie` returns a :class:`MovieFrames`, a lazy ``len()``/``[i]`` sequence of 2D
  frames (what :func:`compute.motion.correct_motion` streams over), memory-mapped for MRC and
  decoded page by page for TIFF/EER. EER frames are rendered by summing ``eer_grouping``
  consecutive electron-event frames (the remainder is dropped, as RELION does).
- :func:`read_gain` reads a gain reference (MRC or TIFF, incl. EER ``.gain`` TIFFs);
  :func:`read_defects` reads a defect map: an image (non-zero = bad) or a text file with one
  ``x y width height`` rectangle per line (MotionCor2/SerialEM style).
- A truncated or unreadable file raises :class:`MetadataError` naming the file and the problem
  (e.g. "truncated: the header promises 40 frames of 512x512 int8 (10485760 bytes) but the file
  holds 5242880").
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import mrcfile
import numpy as np

from metadata.errors import MetadataError

log = logging.getLogger(__name__)

MRC_SUFFIXES = (".mrc", ".mrcs", ".st")
TIFF_SUFFIXES = (".tif", ".tiff")
DM_SUFFIXES = (".dm4", ".dm3")  # Gatan DigitalMicrograph (gain references)
EER_SUFFIXES = (".eer",)


class MovieFrames:
    """Lazy sequence of the frames of one movie (``len()``, ``[i]`` -> 2D ndarray, ``shape``).

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: Path, fmt: str, n_frames: int, shape: tuple[int, int], dtype,
                 getter, closer, group: int = 1) -> None:
        self.path = path
        self.format = fmt
        self._n = n_frames
        self.frame_shape = shape
        self.dtype = np.dtype(dtype)
        self._get = getter
        self._close = closer
        self.group = group

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self._n, *self.frame_shape)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> np.ndarray:
        if isinstance(i, slice):
            raise TypeError("MovieFrames takes one frame index at a time")
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"frame {i} out of range (movie has {self._n})")
        try:
            return self._get(i)
        except MetadataError:
            raise
        except Exception as exc:  # decoder errors of a damaged page
            raise MetadataError(f"frame {i + 1} cannot be read ({type(exc).__name__}: {exc})",
                                self.path) from None

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self._n):
            yield self[i]

    def read_all(self, dtype=np.float32) -> np.ndarray:
        """All frames as one ``(n, y, x)`` array."""
        return np.stack([self[i].astype(dtype, copy=False) for i in range(self._n)])

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> MovieFrames:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Subset:
    """Frames ``first..last`` (0-based, inclusive) of a movie, same interface."""

    def __init__(self, frames, first: int, last: int) -> None:
        self._f, self._first, self._n = frames, first, last - first + 1
        self.frame_shape = frames.frame_shape

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= int(i) < self._n:
            raise IndexError(i)
        return self._f[self._first + int(i)]


def frame_range(frames, first_1based: int = 1, last_1based: int | None = None):
    """RELION's ``first_frame_sum``/``last_frame_sum`` (1-based; last <= 0 means the last frame)."""
    n = len(frames)
    first = max(1, int(first_1based or 1))
    last = n if last_1based is None or int(last_1based) <= 0 else min(n, int(last_1based))
    if first > last:
        raise MetadataError(f"frame range {first}-{last} is empty (movie has {n} frames)")
    if first == 1 and last == n:
        return frames
    return _Subset(frames, first - 1, last - 1)


def movie_format(path: str | Path) -> str:
    suf = Path(path).suffix.lower()
    if suf in MRC_SUFFIXES:
        return "mrc"
    if suf in TIFF_SUFFIXES:
        return "tiff"
    if suf in EER_SUFFIXES:
        return "eer"
    raise MetadataError(f"unknown movie format {suf!r} (expected .mrc, .mrcs, .tif(f) or .eer)",
                        path)


def open_movie(path: str | Path, eer_grouping: int = 32, eer_upsampling: int = 1) -> MovieFrames:
    """Open a movie for frame-by-frame reading.

    Parameters
    ----------
    path
        ``.mrc``/``.mrcs`` (one stack), ``.tif``/``.tiff`` (one frame per page, any compression
        tifffile + imagecodecs decode, e.g. LZW) or ``.eer``.
    eer_grouping
        EER: number of raw event frames summed into one frame.
    eer_upsampling
        EER: 1 renders at the physical 4K grid, 2 at 8K (super-resolution).

    Orientation: row ``y`` of a frame is RELION's row ``y``. MRC and EER frames are used as
    stored; TIFF frames are flipped in Y, as RELION, MotionCor2, IMOD, EMAN2 and SerialEM do
    (TIFF's origin is top-left, MRC's bottom-left).
    """
    p = Path(path)
    if not p.is_file():
        raise MetadataError("movie not found" if not p.exists() else "not a file", p)
    fmt = movie_format(p)
    if fmt == "mrc":
        return _open_mrc(p)
    return _open_tiff(p, fmt, eer_grouping, eer_upsampling)


def _open_mrc(p: Path) -> MovieFrames:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns, then gives None
            m = mrcfile.mmap(p, mode="r", permissive=True)
    except (ValueError, OSError) as exc:
        raise MetadataError(f"not a readable MRC movie ({exc})", p) from None
    h = m.header
    nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
    data = m.data
    if data is None:
        try:
            dtype = np.dtype(mrcfile.utils.dtype_from_mode(int(h.mode)))
        except ValueError:
            m.close()
            raise MetadataError(f"MRC header has an unknown data mode {int(h.mode)}",
                                p) from None
        need = nx * ny * nz * dtype.itemsize + 1024 + int(h.nsymbt)
        have = p.stat().st_size
        m.close()
        raise MetadataError(f"truncated: the header promises {nz} frames of {nx}x{ny} "
                            f"{dtype.name} ({need} bytes) but the file holds {have}", p)
    if data.ndim == 2:
        data = data[None]
    if data.shape != (nz, ny, nx) and data.shape[0] < max(nz, 1):
        m.close()
        raise MetadataError(f"truncated: {data.shape[0]} of {nz} frames present", p)

    def get(i: int) -> np.ndarray:
        return np.asarray(data[i])

    return MovieFrames(p, "mrc", int(data.shape[0]), (int(data.shape[1]), int(data.shape[2])),
                       data.dtype, get, m.close)


def _open_tiff(p: Path, fmt: str, eer_grouping: int, eer_upsampling: int) -> MovieFrames:
    import tifffile  # noqa: PLC0415 - only needed for TIFF/EER

    try:
        tf = tifffile.TiffFile(p)
        pages = tf.pages
        n_pages = len(pages)
        first = pages.first if hasattr(pages, "first") else pages[0]
        shape = tuple(int(v) for v in first.shape[-2:])
        dtype = first.dtype
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error ...
        raise MetadataError(f"not a readable TIFF/EER movie ({type(exc).__name__}: {exc})",
                            p) from None
    if n_pages < 1:
        tf.close()
        raise MetadataError("TIFF holds no image", p)
    size = p.stat().st_size
    # a page whose data runs past the end of the file means the file was cut short
    try:
        last = pages[n_pages - 1]
        offs, counts = last.dataoffsets, last.databytecounts
        end = max((o + c for o, c in zip(offs, counts)), default=0)
    except Exception as exc:
        tf.close()
        raise MetadataError(f"truncated or damaged TIFF ({type(exc).__name__}: {exc})",
                            p) from None
    if end > size:
        tf.close()
        raise MetadataError(f"truncated: the last frame's data ends at byte {end} but the file "
                            f"holds {size}", p)
    if fmt == "eer":
        g = max(1, int(eer_grouping))
        n = n_pages // g
        if n < 1:
            tf.close()
            raise MetadataError(f"EER has {n_pages} event frames, fewer than the grouping {g}", p)
        up = max(1, int(eer_upsampling))
        if up not in (1, 2, 4):
            tf.close()
            raise MetadataError(f"EER upsampling {up}: 1, 2 or 4", p)

        if up > 1:
            # tifffile renders EER sub-pixel positions itself (its superres level k = 2^k x,
            # with the bit layout of each compression 65000/65001/65002 from the file's tags)
            tf.close()
            tf = tifffile.TiffFile(p, superres=int(np.log2(up)))
            pages = tf.pages

        def get_eer(i: int) -> np.ndarray:
            acc = None
            for j in range(i * g, (i + 1) * g):
                fr = pages[j].asarray()
                acc = fr.astype(np.uint16) if acc is None else acc + fr
            return acc

        out_shape = (shape[0] * up, shape[1] * up) if up > 1 else shape
        return MovieFrames(p, "eer", n, out_shape, np.uint16, get_eer, tf.close, g)

    def get(i: int) -> np.ndarray:
        # flipped in Y, as RELION, MotionCor2, IMOD, EMAN2 and SerialEM read (and write) TIFF:
        # TIFF's origin is top-left, MRC's bottom-left; without the flip micrographs (and the
        # map's hand) would be mirrored against theirs, and MRC gains would not fit
        return np.ascontiguousarray(pages[i].asarray()[::-1])

    return MovieFrames(p, "tiff", n_pages, shape, dtype, get, tf.close)


def read_gain(path: str | Path) -> np.ndarray:
    """A gain reference as float32 (MRC; TIFF incl. EER ``.gain``; Gatan ``.dm4``/``.dm3``, as
    SerialEM copies a K2/K3's ``CountRef_*.dm4``); a 3D file uses slice 0.

    Orientation as RELION/IMOD read them: MRC as stored; ``.tif``/``.tiff`` and DigitalMicrograph
    files flipped in Y (top-left origin, like TIFF movies, see :func:`open_movie`); Thermo
    Fisher's ``.gain`` as stored (EER frames are not flipped either; with TIFF movies the
    caller flips it like them).
    """
    p = Path(path)
    if not p.is_file():
        raise MetadataError("gain reference not found", p)
    suf = p.suffix.lower()
    flip = False
    try:
        if suf in DM_SUFFIXES:
            from ncempy.io import dm  # noqa: PLC0415 - only needed for Gatan files

            with dm.fileDM(str(p), on_memory=True) as f:
                g = np.array(f.getDataset(0)["data"], dtype=np.float32)
            flip = True  # top-left origin, flipped like IMOD's dm2mrc
        elif suf in MRC_SUFFIXES:
            with mrcfile.open(p, permissive=True) as m:
                if m.data is None:
                    raise MetadataError("gain reference has no data (truncated?)", p)
                g = np.array(m.data, dtype=np.float32)
        else:
            import tifffile  # noqa: PLC0415

            g = np.asarray(tifffile.imread(p), dtype=np.float32)
            # a .tif/.tiff gain is flipped like TIFF movies; Thermo Fisher's .gain (EER) is
            # used as stored, as RELION's EER renderer does
            flip = suf in TIFF_SUFFIXES
    except MetadataError:
        raise
    except Exception as exc:
        raise MetadataError(f"not a readable gain reference ({type(exc).__name__}: {exc})",
                            p) from None
    if g.ndim == 3:
        g = g[0]
    if g.ndim != 2:
        raise MetadataError(f"gain reference must be 2D, got shape {g.shape}", p)
    return np.ascontiguousarray(g[::-1]) if flip else g


def read_defects(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Defect mask (True = bad pixel) of ``shape`` (rows, columns) from an image or a text list."""
    p = Path(path)
    if not p.is_file():
        raise MetadataError("defect file not found", p)
    suf = p.suffix.lower()
    if suf in MRC_SUFFIXES or suf in TIFF_SUFFIXES:
        img = read_gain(p)
        if img.shape != tuple(shape):
            raise MetadataError(f"defect map is {img.shape[1]}x{img.shape[0]} but the frames "
                                f"are {shape[1]}x{shape[0]}", p)
        return img != 0
    mask = np.zeros(shape, dtype=bool)
    for ln, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        t = line.split("#", 1)[0].split()
        if not t:
            continue
        try:
            x, y, w, h = (int(float(v)) for v in t[:4])
        except ValueError:
            raise MetadataError(f"line {ln}: expected 'x y width height', got {line!r}",
                                p) from None
        mask[max(0, y): max(0, y + h), max(0, x): max(0, x + w)] = True
    return mask
