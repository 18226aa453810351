"""Qt-free readers that turn a project directory into the NumPy data the monitor shows.

Everything here runs on a worker thread (see :mod:`app.gui.workers`); the GUI thread only
receives the returned dataclasses (NumPy arrays and plain Python values). The readers use
the RELION 4 file formats, which are fixed, through :mod:`metadata.star` / :mod:`metadata.images`:

- ``Schemes/<name>/scheme.star`` — current node, variables, jobs (``scheme_*`` tables)
- ``CtfFind/jobNNN/micrographs_ctf.star`` — ``rlnDefocusU/V``, ``rlnCtfMaxResolution``
- ``MotionCorr/jobNNN/corrected_micrographs.star`` — ``rlnAccumMotionTotal``
- ``AutoPick/jobNNN/autopick.star`` — ``coordinate_files`` → per-micrograph coordinate STARs
- ``Class2D/jobNNN/run_itNNN_model.star`` + ``run_itNNN_classes.mrcs`` (+ ``_data.star``)
- ``Select/jobNNN/rank_model.star`` — ``rlnClassScore`` per class
- ``InitialModel|Refine3D/jobNNN/run_*class001.mrc`` and ``run_model.star`` (FSC)

A :class:`ProjectReader` caches parsed files by (path, mtime) so a rescan costs a few
``stat`` calls when nothing changed.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from app.errors import USER_ERRORS
from app.gui.model import (
    GalleryData,
    JobState,
    Map3D,
    MicrographTable,
    MicrographView,
    ProjectSnapshot,
    SchemeState,
)
from metadata.errors import MetadataError

USER_ERRORS_ALL = (*USER_ERRORS, OSError, ValueError, KeyError)
#: api.status job states -> the monitor's words
_STATE_MAP = {"not started": "pending", "incomplete": "stopped"}

log = logging.getLogger(__name__)

EXIT_FILES = (("RELION_JOB_EXIT_FAILURE", "failure"), ("RELION_JOB_EXIT_ABORTED", "aborted"),
              ("RELION_JOB_EXIT_SUCCESS", "success"))
JOB_FOLDERS = ("Import", "MotionCorr", "CtfFind", "Select", "AutoPick", "Extract", "Class2D",
               "InitialModel", "Refine3D")
_TIME_RE = re.compile(r"(20\d{6})_(\d{6})")
_IT_RE = re.compile(r"run_it(\d{3,})_model\.star$")


def _mtime(p: Path) -> float | None:
    try:
        return p.stat().st_mtime
    except OSError:
        return None


def exit_status(job_dir: Path) -> str | None:
    for fname, state in EXIT_FILES:
        if (job_dir / fname).exists():
            return state
    return None


def tail(path: Path, n_bytes: int = 3000) -> str:
    """The last ``n_bytes`` of a text file ('' when absent)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - n_bytes))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > n_bytes and "\n" in text:
        text = text.split("\n", 1)[1]
    return text


def lock_is_live(project: Path, scheme: str) -> bool:
    """True when the scheme's lock exists and (if it names a pid) that process is alive."""
    lock = project / f".relion_lock_scheme_{scheme}" / "lock_scheme"
    if not lock.exists():
        return False
    try:
        text = lock.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    m = re.search(r"\b(\d{2,})\b", text)
    if not m:
        return True
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes")
    return bool(int(v)) if v == v else False


def _normalise_u8(stack: np.ndarray) -> np.ndarray:
    """Each image scaled to 0–255 around its mean ± 3σ (RELION display's sigma contrast)."""
    a = stack.astype(np.float32, copy=False)
    mu = a.mean(axis=(1, 2), keepdims=True)
    sd = a.std(axis=(1, 2), keepdims=True)
    sd[sd == 0] = 1.0
    scaled = (a - mu) / (6.0 * sd) + 0.5
    return np.clip(scaled * 255.0, 0, 255).astype(np.uint8)


class ProjectReader:
    """Reads one project directory; caches parsed files by (path, mtime)."""

    def __init__(self, project_dir: str | Path) -> None:
        self.project = Path(project_dir)
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}

    # -- cache -------------------------------------------------------------------------------
    def _cached(self, kind: str, path: Path, load: Callable[[Path], Any]) -> Any:
        mt = _mtime(path)
        if mt is None:
            raise MetadataError("file not found", path)
        key = (kind, str(path))
        hit = self._cache.get(key)
        if hit is not None and hit[0] == mt:
            return hit[1]
        value = load(path)
        self._cache[key] = (mt, value)
        return value

    def _star(self, path: Path) -> dict[str, pd.DataFrame]:
        from metadata.star import read_star

        return self._cached("star", path, read_star)

    def _table(self, path: Path, block: str) -> pd.DataFrame:
        data = self._star(path)
        if block in data:
            return data[block]
        if len(data) == 1 and block == "":
            return next(iter(data.values()))
        have = ", ".join(data) or "none"
        raise MetadataError(f"no data_{block} table (tables present: {have})", path)

    # -- schemes -------------------------------------------------------------------------------
    def scheme_names(self) -> list[str]:
        root = self.project / "Schemes"
        if not root.is_dir():
            return []
        return sorted(p.parent.name for p in root.glob("*/scheme.star"))

    def read_scheme(self, name: str) -> SchemeState:
        """The scheme's state from :func:`app.schemes.api.status`, plus each job's log tail."""
        from app.gui.backend_adapter import scheme_status

        try:
            d = scheme_status(self.project, name)
        except USER_ERRORS_ALL as exc:
            # e.g. scheme.star being replaced this instant: report, keep the last view
            return SchemeState(name, "?", lock_is_live(self.project, name), error=str(exc))
        st = SchemeState(name, str(d.get("current_node", "undefined")), bool(d.get("running")))
        st.nodes = node_order(d.get("edges") or [])
        if d.get("state") in ("failed", "aborted") and d.get("message"):
            st.error = f"{d['state']}: {d['message']}"
        for var, v in (d.get("variables") or {}).items():
            kind, value = v.get("type"), v.get("value")
            if kind == "float":
                st.floats[var] = _to_float(value)
            elif kind == "bool":
                st.bools[var] = _bool(value)
            else:
                st.strings[var] = str(value)
        for j in d.get("jobs") or []:
            cur = str(j.get("current", ""))
            status = _STATE_MAP.get(str(j.get("state")), str(j.get("state")))
            log_tail = ""
            if "/" in cur and not cur.startswith("Schemes/"):
                job_dir = self.project / cur
                log_tail = tail(job_dir / "run.out")
                err = tail(job_dir / "run.err", 1000).strip()
                if err:
                    log_tail += "\n--- run.err ---\n" + err
            st.jobs.append(JobState(str(j.get("name")), cur, str(j.get("mode", "")),
                                    bool(j.get("has_started")), status, log_tail,
                                    str(j.get("type", ""))))
        return st

    def snapshot(self) -> ProjectSnapshot:
        schemes = [self.read_scheme(n) for n in self.scheme_names()]
        stamps: dict[str, tuple[str | None, float]] = {}
        for d in self.job_dirs():
            rel = d.relative_to(self.project).as_posix() + "/"
            stamps[rel] = (exit_status(d), _dir_stamp(d))
        return ProjectSnapshot(self.project, schemes, stamps)

    def job_dirs(self, kind: str | None = None) -> list[Path]:
        """Job output directories ``<Type>/jobNNN`` (optionally one type), oldest first.

        Type folders match case-insensitively (``Class2D`` and ``Class2d`` are the same
        type), so projects made by RELION and by test-double jobs read alike.
        """
        kinds = {k.lower() for k in ([kind] if kind else JOB_FOLDERS)}
        out = []
        try:
            tops = [d for d in self.project.iterdir() if d.name.lower() in kinds and d.is_dir()]
        except OSError:
            return []
        for base in tops:
            out.extend(p for p in base.glob("job[0-9][0-9][0-9]*") if p.is_dir())
        return sorted(out, key=lambda p: (p.name, p.parent.name))

    def latest_with(self, kind: str, filename: str) -> Path | None:
        """Newest job dir of ``kind`` that holds ``filename``."""
        found = [d for d in self.job_dirs(kind) if (d / filename).exists()]
        return found[-1] if found else None

    # -- micrograph table -------------------------------------------------------------------
    def micrograph_table(self) -> MicrographTable | None:
        """Per-micrograph CTF, motion and pick counts joined by micrograph name."""
        ctf_dir = self.latest_with("CtfFind", "micrographs_ctf.star")
        mc_dir = self.latest_with("MotionCorr", "corrected_micrographs.star")
        if ctf_dir is None and mc_dir is None:
            return None
        frames: list[pd.DataFrame] = []
        if mc_dir is not None:
            mc = self._table(mc_dir / "corrected_micrographs.star", "micrographs")
            _require(mc, ("rlnMicrographName",), mc_dir / "corrected_micrographs.star")
            cols = [c for c in ("rlnMicrographName", "rlnAccumMotionTotal") if c in mc]
            frames.append(mc[cols])
        if ctf_dir is not None:
            ctf = self._table(ctf_dir / "micrographs_ctf.star", "micrographs")
            _require(ctf, ("rlnMicrographName",), ctf_dir / "micrographs_ctf.star")
            cols = [c for c in ("rlnMicrographName", "rlnDefocusU", "rlnDefocusV",
                                "rlnCtfMaxResolution") if c in ctf]
            frames.append(ctf[cols])
        df = frames[0]
        for other in frames[1:]:
            df = df.merge(other, on="rlnMicrographName", how="outer")
        names = [str(n) for n in df["rlnMicrographName"]]
        n = len(names)

        def col(c: str) -> np.ndarray:
            return df[c].to_numpy(dtype=float) if c in df else np.full(n, np.nan)

        defocus = 0.5 * (col("rlnDefocusU") + col("rlnDefocusV")) / 1e4
        picks = self._pick_counts(names)
        times = [_acq_time(nm) for nm in names]
        if n and all(t is not None for t in times):
            t0 = min(times)  # type: ignore[type-var]
            tmin = np.array([(t - t0).total_seconds() / 60.0 for t in times])  # type: ignore
            by_index = False
        else:
            tmin, by_index = np.arange(n, dtype=float), True
        order = np.argsort(tmin, kind="stable")
        table = MicrographTable([names[i] for i in order], tmin[order], by_index,
                                defocus[order], col("rlnCtfMaxResolution")[order],
                                col("rlnAccumMotionTotal")[order], picks[order])
        table.compute_histograms()
        return table

    def _coordinate_files(self) -> dict[str, Path]:
        d = self.latest_with("AutoPick", "autopick.star")
        if d is None:
            return {}
        t = self._table(d / "autopick.star", "coordinate_files")
        _require(t, ("rlnMicrographName", "rlnMicrographCoordinates"), d / "autopick.star")
        out = {}
        for mic, coords in zip(t["rlnMicrographName"], t["rlnMicrographCoordinates"]):
            out[str(mic)] = self.project / str(coords)
        return out

    def _pick_counts(self, names: list[str]) -> np.ndarray:
        files = self._coordinate_files()
        counts = np.full(len(names), np.nan)
        for i, nm in enumerate(names):
            p = files.get(nm)
            if p is None:
                continue
            try:
                counts[i] = len(self._table(p, ""))
            except MetadataError:
                # a coordinate file with no particles has no table; count zero
                counts[i] = 0.0 if p.exists() else np.nan
        return counts

    # -- one micrograph -----------------------------------------------------------------------
    def micrograph_view(self, name: str | None = None, max_px: int = 768) -> MicrographView | None:
        """The chosen (default: latest) micrograph binned for display, picks, and spectrum."""
        from metadata.images import read_mrc

        table = self.micrograph_table()
        if table is None or not table.names:
            return None
        name = name or table.names[-1]
        path = self.project / name
        img, px = read_mrc(path)
        img = np.asarray(img, dtype=np.float32)
        if img.ndim == 3:
            img = img[0]
        b = max(1, int(np.ceil(max(img.shape) / max_px)))
        h, w = (img.shape[0] // b) * b, (img.shape[1] // b) * b
        small = img[:h, :w].reshape(h // b, b, w // b, b).mean(axis=(1, 3))
        picks = np.zeros((0, 2))
        p = self._coordinate_files().get(name)
        if p is not None and p.exists():
            try:
                c = self._table(p, "")
                picks = np.stack([c["rlnCoordinateX"].to_numpy(float),
                                  c["rlnCoordinateY"].to_numpy(float)], axis=1) / b
            except (MetadataError, KeyError):
                picks = np.zeros((0, 2))
        spectrum = self._spectrum(img, name, px)
        lo, hi = (float(x) for x in np.percentile(small, [1, 99]))
        diam = self._pick_diameter_a()
        diam_px = diam / px / b if diam and px else 0.0
        return MicrographView(name, small, float(b), picks, spectrum, diam_px,
                              (lo, hi if hi > lo else lo + 1))

    def _pick_diameter_a(self) -> float | None:
        """The picking diameter (Å) from the newest AutoPick job's options."""
        from app.schemes.jobstar import read_job_star

        d = self.latest_with("AutoPick", "job.star")
        if d is None:
            return None
        try:
            opts = read_job_star(d / "job.star").options
        except USER_ERRORS_ALL:
            return None
        key = "topaz_particle_diameter" if str(opts.get("do_topaz", "No")) == "Yes" else \
            "log_diam_max"
        v = _to_float(opts.get(key))
        return v if v > 0 else None

    def _spectrum(self, img: np.ndarray, name: str, px: float | None, box: int = 256) -> np.ndarray:
        """Tile-averaged log power spectrum; left half replaced by the fitted CTF² model."""
        ny, nx = img.shape
        box = min(box, ny, nx) // 2 * 2
        tiles = []
        for y in range(0, ny - box + 1, box):
            for x in range(0, nx - box + 1, box):
                t = img[y:y + box, x:x + box]
                tiles.append(t - t.mean())
        ps = (np.abs(np.fft.fft2(np.stack(tiles))) ** 2).mean(axis=0)
        ps = np.fft.fftshift(np.log1p(ps))
        c = box // 2
        ps[c, c] = np.median(ps)
        lo, hi = np.percentile(ps, [5, 99.5])
        ps = np.clip((ps - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
        params = self._ctf_params(name)
        if params is not None and px:
            from compute.ctf import ctf_2d

            model = np.fft.fftshift(ctf_2d((box, box), float(px), params)) ** 2
            ps[:, :c] = model[:, :c]
        return ps

    def _ctf_params(self, name: str):
        from compute.ctf import CtfParams

        d = self.latest_with("CtfFind", "micrographs_ctf.star")
        if d is None:
            return None
        data = self._star(d / "micrographs_ctf.star")
        mics = data.get("micrographs")
        if mics is None or "rlnDefocusU" not in mics:
            return None
        row = mics[mics["rlnMicrographName"] == name]
        if row.empty:
            return None
        r = row.iloc[0]
        optics = data.get("optics")
        o = optics.iloc[0] if optics is not None and len(optics) else {}
        return CtfParams(float(r["rlnDefocusU"]), float(r["rlnDefocusV"]),
                         float(r.get("rlnDefocusAngle", 0.0)),
                         float(o.get("rlnVoltage", 300.0)),
                         float(o.get("rlnSphericalAberration", 2.7)),
                         float(o.get("rlnAmplitudeContrast", 0.1)))

    # -- 2D classes -------------------------------------------------------------------------
    def gallery(self, class2d_dir: Path | None = None) -> GalleryData | None:
        """The newest Class2D iteration with its class averages and ranker scores."""
        from metadata.images import read_mrc

        dirs = [class2d_dir] if class2d_dir else self.job_dirs("Class2D")[::-1]
        for d in dirs:
            its = sorted((int(m.group(1)), p) for p in d.glob("run_it*_model.star")
                         if (m := _IT_RE.search(p.name)))
            its = [(i, p) for i, p in its
                   if (p.parent / p.name.replace("_model.star", "_classes.mrcs")).exists()]
            if its:
                it, model_path = its[-1]
                break
        else:
            return None
        job = d.relative_to(self.project).as_posix() + "/"
        classes = self._table(model_path, "model_classes")
        _require(classes, ("rlnReferenceImage",), model_path)
        refs = [str(r) for r in classes["rlnReferenceImage"]]
        numbers = np.array([int(r.split("@")[0]) for r in refs], dtype=int)
        stack = self._cached("mrc", model_path.parent / model_path.name.replace(
            "_model.star", "_classes.mrcs"), lambda p: read_mrc(p)[0])
        stack = np.asarray(stack)
        if stack.ndim == 2:
            stack = stack[None]
        if numbers.max(initial=0) > stack.shape[0]:
            raise MetadataError(f"model lists {numbers.max()} classes but the stack holds "
                                f"{stack.shape[0]}", model_path)
        images = _normalise_u8(stack[numbers - 1])
        dist = classes["rlnClassDistribution"].to_numpy(float) if "rlnClassDistribution" in \
            classes else np.full(len(numbers), np.nan)
        res = classes["rlnEstimatedResolution"].to_numpy(float) if "rlnEstimatedResolution" in \
            classes else np.full(len(numbers), np.nan)
        n_parts = self._class_counts(model_path, numbers, dist)
        scores = np.full(len(numbers), np.nan)
        select_job = None
        sel = self._select_for(job)
        if sel is not None:
            select_job = sel.relative_to(self.project).as_posix() + "/"
            scores = self._scores(sel / "rank_model.star", numbers)
        out = GalleryData(job, it, numbers, images, scores, dist, n_parts, res, select_job, refs)
        if sel is not None:
            out.stored_overrides = self._stored_choices(sel)
            out.threshold = self._select_threshold(sel)
        return out

    def _stored_choices(self, select_dir: Path) -> dict[int, bool]:
        """Classes where the operator overrode the ranker (``ranker_feedback.star``)."""
        p = select_dir / "ranker_feedback.star"
        if not p.exists():
            return {}
        t = self._star(p).get("feedback")
        if t is None or not {"rlnClassNumber", "rlnSelected", "rlnAutoSelected"} <= set(t):
            raise MetadataError("no data_feedback table with rlnClassNumber, rlnSelected, "
                                "rlnAutoSelected", p)
        diff = t[t["rlnSelected"].astype(int) != t["rlnAutoSelected"].astype(int)]
        return {int(c): bool(int(v)) for c, v in zip(diff["rlnClassNumber"], diff["rlnSelected"])}

    def _select_threshold(self, select_dir: Path) -> float | None:
        from app.schemes.jobstar import read_job_star

        try:
            v = _to_float(read_job_star(select_dir / "job.star").options.get("rank_threshold"))
        except USER_ERRORS_ALL:
            return None
        return v if np.isfinite(v) else None

    def _class_counts(self, model_path: Path, numbers: np.ndarray, dist: np.ndarray
                      ) -> np.ndarray:
        data_path = model_path.parent / model_path.name.replace("_model.star", "_data.star")
        if data_path.exists():
            try:
                parts = self._table(data_path, "particles")
                counts = parts["rlnClassNumber"].astype(int).value_counts()
                return np.array([int(counts.get(int(c), 0)) for c in numbers])
            except (MetadataError, KeyError):
                pass  # fall through: counts unknown
        return np.full(len(numbers), -1, dtype=int)

    def _select_for(self, class2d_job: str) -> Path | None:
        """The newest Select job whose ranker scored ``class2d_job`` (None: not ranked yet).

        A Select job belongs to a Class2D job when its ``job.star`` ``fn_model`` points into
        it, or (no job.star) when its ``rank_model.star`` names that job's class images.
        """
        from app.schemes.jobstar import read_job_star

        job = class2d_job.rstrip("/") + "/"
        for d in reversed([d for d in self.job_dirs("Select") if (d / "rank_model.star").exists()]):
            js = d / "job.star"
            if js.exists():
                try:
                    fn_model = str(read_job_star(js).options.get("fn_model", ""))
                except USER_ERRORS_ALL:
                    fn_model = ""
                if fn_model.startswith(job):
                    return d
                if fn_model:
                    continue
            t = next(iter(self._star(d / "rank_model.star").values()), None)
            if t is not None and "rlnReferenceImage" in t and any(
                    f"@{job}" in str(r) for r in t["rlnReferenceImage"][:5]):
                return d
        return None

    def _scores(self, rank_path: Path, numbers: np.ndarray) -> np.ndarray:
        data = self._star(rank_path)
        t = data.get("model_classes")
        if t is None:
            t = next(iter(data.values()))
        if "rlnClassScore" not in t:
            raise MetadataError("no rlnClassScore column", rank_path)
        sc = t["rlnClassScore"].to_numpy(float)
        if "rlnClassNumber" in t:
            idx = t["rlnClassNumber"].astype(int).to_numpy()
        elif "rlnReferenceImage" in t:
            idx = np.array([int(str(r).split("@")[0]) for r in t["rlnReferenceImage"]])
        else:
            idx = np.arange(1, len(sc) + 1)
        sc = np.where(sc <= -900, np.nan, sc)  # the ranker's -999: could not be scored
        lookup = dict(zip(idx.tolist(), sc.tolist()))
        return np.array([lookup.get(int(c), np.nan) for c in numbers])

    # -- 3D ---------------------------------------------------------------------------------
    def map3d(self, kind: str) -> Map3D | None:
        """Central slices (+ FSC for Refine3D) of the newest map of ``InitialModel``/``Refine3D``."""
        from metadata.images import read_mrc

        for d in reversed(self.job_dirs(kind)):
            final = sorted(d.glob("initial_model.mrc")) + sorted(d.glob("run_class0*.mrc"))
            its = sorted(p for p in d.glob("run_it*_class0*.mrc"))
            halves = sorted(d.glob("run_it*_half1_class0*.mrc"))
            cand = final or its or halves
            if cand:
                path = cand[-1] if not final else final[0]
                break
        else:
            return None
        vol = np.asarray(self._cached("mrc", path, lambda p: read_mrc(p)[0]), dtype=np.float32)
        if vol.ndim != 3:
            raise MetadataError(f"expected a 3D map, got shape {vol.shape}", path)
        z, y, x = (s // 2 for s in vol.shape)
        out = Map3D(d.relative_to(self.project).as_posix() + "/", path.name,
                    (vol[z].copy(), vol[:, y].copy(), vol[:, :, x].copy()))
        model = d / "run_model.star"
        if not model.exists():
            models = sorted(d.glob("run_it*_half1_model.star")) or sorted(d.glob(
                "run_it*_model.star"))
            model = models[-1] if models else model
        if model.exists():
            data = self._star(model)
            t = data.get("model_class_1")
            if t is not None and "rlnGoldStandardFsc" in t and "rlnResolution" in t:
                k = t["rlnResolution"].to_numpy(float)
                out.fsc_resolution_a = np.where(k > 0, 1.0 / np.maximum(k, 1e-9), np.inf)
                out.fsc = t["rlnGoldStandardFsc"].to_numpy(float)
            g = data.get("model_general")
            if g is not None and "rlnCurrentResolution" in g:
                out.resolution_a = float(g.iloc[0]["rlnCurrentResolution"])
        return out


def node_order(edges: list[dict]) -> list[str]:
    """Nodes reachable from the first edge's input, breadth-first (fork targets included)."""
    if not edges:
        return []
    nxt: dict[str, list[str]] = {}
    for e in edges:
        outs = [str(e.get("output"))]
        if e.get("is_fork") and e.get("output_if_true") not in (None, "", "undefined"):
            outs.append(str(e["output_if_true"]))
        nxt.setdefault(str(e.get("input")), []).extend(outs)
    order, queue = [], [str(edges[0].get("input"))]
    while queue:
        n = queue.pop(0)
        if n in order or n in ("", "undefined", "None"):
            continue
        order.append(n)
        queue.extend(nxt.get(n, []))
    return order


def _require(df: pd.DataFrame, cols: tuple[str, ...], path: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise MetadataError(f"no {', '.join(missing)} column", path)


def _dir_stamp(d: Path) -> float:
    """Newest mtime of a job directory and the files directly in it."""
    best = _mtime(d) or 0.0
    try:
        with os.scandir(d) as it:
            for e in it:
                try:
                    best = max(best, e.stat(follow_symlinks=False).st_mtime)
                except OSError:
                    continue
    except OSError:
        pass
    return best


def _acq_time(name: str) -> _dt.datetime | None:
    m = _TIME_RE.search(Path(name).name)
    if not m:
        return None
    try:
        return _dt.datetime.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S")
    except ValueError:
        return None


class ProjectScanner:
    """One refresh step of the monitor: what changed since the last step, loaded.

    :meth:`step` returns a dict with any of ``snapshot`` (when scheme state changed),
    ``table``, ``gallery``, ``maps``, ``micrograph`` (when their job folders changed) and
    ``errors`` (one line per failed load). Runs in the monitor's loader process (see
    :func:`scan_step`), or in-process in tests.
    """

    def __init__(self, project: str | Path) -> None:
        self.reader = ProjectReader(project)
        self._last_key: object = None
        self._last_stamps: dict[str, tuple[str | None, float]] = {}
        self._want_mic: str | None = None
        self._mic_dirty = True

    def want_micrograph(self, name: str | None) -> None:
        self._want_mic = name or None
        self._mic_dirty = True

    def step(self) -> dict[str, Any]:
        out: dict[str, Any] = {"errors": []}
        r = self.reader
        try:
            snap = r.snapshot()
        except Exception as exc:  # noqa: BLE001 - reported in the window
            out["errors"].append(f"reading the project: {_describe(exc)}")
            return out
        out["job_dirs"] = list(snap.job_stamps)
        key = repr([(s.name, s.current_node, s.running, s.floats, s.bools, s.strings,
                     [(j.job_dir, j.status, j.log_tail[-300:]) for j in s.jobs], s.error)
                    for s in snap.schemes])
        if key != self._last_key:
            self._last_key = key
            out["snapshot"] = snap
        changed = {k for k, v in snap.job_stamps.items() if self._last_stamps.get(k) != v}
        changed |= set(self._last_stamps) - set(snap.job_stamps)
        self._last_stamps = dict(snap.job_stamps)
        kinds = {_CANON.get(c.split("/")[0].lower(), "") for c in changed}
        mic_kinds = bool(kinds & {"CtfFind", "MotionCorr", "AutoPick"})
        if mic_kinds:
            self._load(out, "table", "micrograph table", r.micrograph_table)
        if kinds & {"Class2D", "Select"}:
            self._load(out, "gallery", "2D classes", r.gallery)
        if kinds & {"InitialModel", "Refine3D"}:
            self._load(out, "maps", "3D maps",
                       lambda: (r.map3d("InitialModel"), r.map3d("Refine3D")))
        if mic_kinds or self._mic_dirty:
            self._mic_dirty = False
            self._load(out, "micrograph", "micrograph", lambda: r.micrograph_view(self._want_mic))
        return out

    @staticmethod
    def _load(out: dict[str, Any], key: str, what: str, fn: Callable[[], Any]) -> None:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - reported in the window
            out["errors"].append(f"{what}: {_describe(exc)}")
            return
        if value is not None:
            out[key] = value


_CANON = {k.lower(): k for k in JOB_FOLDERS}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, USER_ERRORS):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


#: scanners living in the loader process, one per project
_SCANNERS: dict[str, ProjectScanner] = {}


def scan_step(project: str, want_mic: str | None = None, set_mic: bool = False
              ) -> dict[str, Any]:
    """:meth:`ProjectScanner.step` for ``project`` in this (loader) process; keeps state."""
    sc = _SCANNERS.get(project)
    if sc is None:
        sc = _SCANNERS[project] = ProjectScanner(project)
    if set_mic:
        sc.want_micrograph(want_mic)
    return sc.step()


def loader_init() -> None:
    """Start-up of the loader process: import what the first scan needs."""
    import app.schemes.api  # noqa: F401
    import metadata.images  # noqa: F401
    import metadata.star  # noqa: F401
