"""Write EER (Electron Event Representation) movies, as Falcon 4/4i cameras record them.

An EER file is a BigTIFF with one page per EER frame; each page's single strip is a
little-endian bitstream (TIFF compression 65001, "7-bit" EER):

- a 7-bit code ``p`` skips ``p`` pixels (row-major); ``p == 127`` skips 127 and carries no
  electron; otherwise an electron sits at the next pixel and a 4-bit sub-pixel code
  follows (stored XOR 0x0A: bits 0-1 the x, bits 2-3 the y sub-pixel);
- the stream ends with the code that brings the pixel count to exactly ``ny * nx`` (a 0-skip
  after an electron on the last pixel), zero-padded to an even number of bytes.

The first page carries the acquisition metadata (TIFF tag 65001,
``<metadata><item name=... unit=...>...</item></metadata>``). Every written frame is checked
against :func:`imagecodecs.eer_decode` (the decoder tifffile uses) in the tests; RELION's
reader uses the same termination rule but accepts only 4096 x 4096 frames.

At most one electron per pixel per EER frame can be written: a movie's dose fractions are
split into ``eer_frames_per_fraction`` EER frames by assigning each counted electron to a
random EER frame of its fraction (exact Poisson thinning); coincidences left over (two
electrons in one pixel of one EER frame) are merged, as on the real detector.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from app.errors import UserError

SKIP_BITS = 7
MAX_SKIP = 127
COMPRESSION_EER_7BIT = 65001


def encode_eer_frame(frame: np.ndarray, subpixel: np.ndarray | None = None) -> bytes:
    """Encode one EER frame of 0/1 counts ``(ny, nx)`` as a 7-bit EER bitstream.

    ``subpixel`` holds one 4-bit sub-pixel code (0-15) per electron in row-major order
    (default 0: top-left quarter-pixel).
    """
    flat = np.flatnonzero(np.asarray(frame).ravel())
    total = int(np.asarray(frame).size)
    n_e = flat.size
    gaps = np.diff(np.concatenate([[-1], flat])) - 1
    q = gaps // MAX_SKIP
    r = gaps % MAX_SKIP
    tail = total - (int(flat[-1]) + 1 if n_e else 0)
    q_tail, r_tail = divmod(tail, MAX_SKIP)
    # the stream ends on the code that reaches the last pixel: no code after it, but a
    # 0-skip when the last electron sits on the very last pixel
    tail_codes = q_tail + (1 if (r_tail or tail == 0) else 0)
    per = q + 2  # 127-skips, the skip before the electron, the sub-pixel code
    n_codes = int(per.sum()) + tail_codes
    vals = np.full(n_codes, MAX_SKIP, dtype=np.uint32)
    widths = np.full(n_codes, SKIP_BITS, dtype=np.uint32)
    ends = np.cumsum(per)
    vals[ends - 2] = r
    sub = np.zeros(n_e, np.uint32) if subpixel is None else np.asarray(subpixel, np.uint32)
    if sub.shape != (n_e,):
        raise ValueError(f"{n_e} electrons but {sub.shape} sub-pixel codes")
    vals[ends - 1] = (sub & 15) ^ 0x0A
    widths[ends - 1] = 4
    if tail_codes and (r_tail or tail == 0):
        vals[-1] = r_tail
    # pack: codes never share bits, so summing their bytes per byte index equals OR-ing
    off = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
    n_bytes = int((off[-1] + widths[-1] + 7) // 8) if n_codes else 0
    n_bytes += n_bytes % 2  # readers take the stream as 16-bit words: even length
    shifted = vals.astype(np.int64) << (off & 7)
    byte = off >> 3
    out = np.zeros(n_bytes + 3, dtype=np.float64)
    for k in range(3):
        part = (shifted >> (8 * k)) & 0xFF
        out += np.bincount(byte + k, weights=part, minlength=n_bytes + 3)
    return out[:n_bytes].astype(np.uint8).tobytes()


def eer_metadata_xml(*, n_frames: int, shape: tuple[int, int], pixel_size_a: float | None,
                     exposure_time_s: float | None, total_dose_e_px: float | None,
                     when: _dt.datetime | None = None) -> bytes:
    """The acquisition metadata tag (65001) in the items layout EER files use."""
    when = when or _dt.datetime(2024, 5, 17, 10, 30, 0)
    items = [("acquisitionID", None, "scopeside-simulated"), ("cameraName", None, "BM-Falcon"),
             ("commercialName", None, "Falcon 4i"), ("eerCompressionVersion", None, "1"),
             ("imageHeight", "pixel", str(shape[0])), ("imageWidth", "pixel", str(shape[1])),
             ("numberOfFrames", None, str(int(n_frames))),
             ("sensorImageHeight", "pixel", str(shape[0])),
             ("sensorImageWidth", "pixel", str(shape[1])),
             ("timestamp", None, when.isoformat())]
    if exposure_time_s is not None:
        items.append(("exposureTime", "s", repr(float(exposure_time_s))))
    if pixel_size_a is not None:
        items.append(("sensorPixelSize.height", "m", repr(float(pixel_size_a) * 1e-10)))
        items.append(("sensorPixelSize.width", "m", repr(float(pixel_size_a) * 1e-10)))
    if total_dose_e_px is not None:
        items.append(("totalDose", "e/pixel", repr(float(total_dose_e_px))))
    body = "".join(
        f'<item name="{escape(k)}"' + (f' unit="{escape(u)}"' if u else "") + f">{escape(v)}</item>"
        for k, u, v in items)
    return f"<metadata>{body}</metadata>".encode()


def split_fraction(counts: np.ndarray, n_sub: int, rng: np.random.Generator) -> np.ndarray:
    """Split one fraction of counts ``(ny, nx)`` into ``n_sub`` 0/1 EER frames: each electron
    goes to a uniformly random EER frame (Poisson thinning); coincidences are merged."""
    c = np.asarray(counts)
    flat = np.flatnonzero(c.ravel())
    pos = np.repeat(flat, c.ravel()[flat].astype(np.int64))
    which = rng.integers(0, n_sub, pos.size)
    out = np.zeros((n_sub, c.size), dtype=np.uint8)
    out[which, pos] = 1
    return out.reshape((n_sub,) + c.shape)


def write_eer(path: str | Path, fractions: np.ndarray, *, eer_frames_per_fraction: int = 10,
              pixel_size_a: float | None = None, exposure_time_s: float | None = None,
              seed: int | None = 0, hot_pixels: np.ndarray | None = None) -> Path:
    """Write counted ``fractions`` ``(n, ny, nx)`` as an EER movie of
    ``n * eer_frames_per_fraction`` EER frames (sub-pixel positions uniform at random).

    ``hot_pixels`` (``(k, 2)`` y, x) fire in every EER frame, as stuck pixels do.
    """
    import tifffile

    p = Path(path)
    data = np.asarray(fractions)
    if data.ndim != 3:
        raise UserError(f"{p}: an EER movie needs (frames, y, x) counts, got {data.shape}")
    if eer_frames_per_fraction < 1:
        raise UserError("eer_frames_per_fraction must be >= 1")
    rng = np.random.default_rng(seed)
    shape = data.shape[1:]
    n_eer = data.shape[0] * eer_frames_per_fraction
    hot = np.zeros((0, 2), int) if hot_pixels is None else np.asarray(hot_pixels).reshape(-1, 2)
    hot_mask = np.zeros(shape, bool)
    hot_mask[hot[:, 0], hot[:, 1]] = True
    total = float(data.astype(np.float64).sum())
    meta = eer_metadata_xml(n_frames=n_eer, shape=shape, pixel_size_a=pixel_size_a,
                            exposure_time_s=exposure_time_s,
                            total_dose_e_px=total / (shape[0] * shape[1]))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.part")
    # tifffile has no EER encoder, so each page is written with our encoded stream under a
    # stand-in compression tag, which is then set to 65001 in place (TiffTag.overwrite)
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        first = True
        for frac in data:
            frac = np.where(hot_mask, 0, frac)  # hot pixels are added per EER frame below
            for sub in split_fraction(frac, eer_frames_per_fraction, rng):
                sub[hot_mask] = 1
                n_e = int(sub.sum())
                stream = encode_eer_frame(sub, rng.integers(0, 16, n_e))
                tw.write(iter([stream]), shape=shape, dtype=np.uint8, compression="zlib",
                         photometric="minisblack", rowsperstrip=shape[0], contiguous=False,
                         metadata=None, software=False,
                         extratags=[(65001, 7, len(meta), meta, True)] if first else None)
                first = False
    with tifffile.TiffFile(tmp, mode="r+b") as tf:
        for page in tf.pages:
            page.tags["Compression"].overwrite(COMPRESSION_EER_7BIT)
    tmp.replace(p)
    return p
