"""One self-contained HTML report of a scopeside project (the demo's closing page).

:func:`write_report` reads only the project's files (and, when given, the simulated session's
``ground_truth/``) and writes ``<dir>/report.html`` with every figure embedded as a PNG data
URI (the PNGs are also written beside it). Sections: acquisition summary, CTF and drift plots,
picks on an example micrograph, the 2D class gallery sorted by ranker score with the
selection, initial model and refined map central slices, FSC curves, per-job wall times and,
for an on-the-fly run, the delays from a movie's arrival to its CTF and 2D results.

A small script in the page sets ``document.title`` to ``report: images N/M loaded`` once the
page has loaded, so a headless browser can check the figures (tests/app/test_demo.py).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import re
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ reading


def _star(path: Path) -> dict:
    from metadata.star import read_star

    try:
        return read_star(path) if path.is_file() else {}
    except Exception as exc:  # noqa: BLE001 - a report section is skipped, named in the page
        log.warning("%s: %s", path, exc)
        return {}


def _scheme_job_dir(project: Path, scheme: str, job: str) -> Path | None:
    from app.schemes.model import Scheme

    try:
        sch = Scheme.load(project, scheme, validate=False)
    except Exception as exc:  # noqa: BLE001 - no such scheme: section left out
        log.debug("%s", exc)
        return None
    j = sch.jobs.get(job)
    if j is None or "/" not in j.current_name:
        return None
    d = project / j.current_name
    return d if d.is_dir() else None


def _latest_success(project: Path, kind: str) -> Path | None:
    """The newest ``<kind>/jobNNN`` with a success marker."""
    jobs = sorted((project / kind).glob("job[0-9]*"))
    for d in reversed(jobs):
        if (d / "RELION_JOB_EXIT_SUCCESS").exists():
            return d
    return None


def _mrc(path: Path) -> np.ndarray | None:
    from metadata.images import read_mrc

    try:
        return read_mrc(path)[0]
    except Exception as exc:  # noqa: BLE001 - figure left out, named in the page
        log.warning("%s: %s", path, exc)
        return None


def _image_ref(ref: str, project: Path) -> np.ndarray | None:
    """``k@stack.mrcs`` -> that image."""
    from metadata.images import read_mrc

    idx, _, f = str(ref).partition("@")
    p = project / f
    if not p.exists():
        return None
    try:
        data = read_mrc(p)[0]
    except Exception as exc:  # noqa: BLE001
        log.warning("%s: %s", p, exc)
        return None
    data = data if data.ndim == 3 else data[None]
    k = int(idx) - 1
    return data[k] if 0 <= k < len(data) else None


# ------------------------------------------------------------------------------ figures


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


class _Figures:
    """Collects PNGs (written beside the report and embedded)."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.n = 0

    def save(self, fig, name: str) -> str:
        plt = _plt()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        data = buf.getvalue()
        (self.out_dir / f"{name}.png").write_bytes(data)
        self.n += 1
        b64 = base64.b64encode(data).decode("ascii")
        return (f'<img class="fig" alt="{html.escape(name)}" src="data:image/png;base64,{b64}">')


def _table(rows: list[tuple], head: tuple | None = None) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "(unknown)"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _hms(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _section_acquisition(project: Path, session: Path | None) -> str:
    parts = []
    summ = project / "session_summary.json"
    if summ.exists():
        js = json.loads(summ.read_text(encoding="utf-8"))
        keys = ("software", "software_version", "n_movies", "n_grid_squares", "n_foil_holes",
                "microscope", "voltage_kv", "cs_mm", "pixel_size_a", "detector", "n_frames",
                "dose_per_frame_e_a2", "total_dose_e_a2", "exposure_time_s", "started_at")
        # None = the files do not hold it (EPU XML has no Cs, for instance): the operator
        # confirms it below, so say that rather than "(unknown)"
        parts.append(_table([(k, "not in the metadata" if js.get(k) is None else js.get(k))
                             for k in keys if k in js], ("metadata", "value")))
    ds = project / "demo_settings.json"
    if ds.exists():
        js = json.loads(ds.read_text(encoding="utf-8"))
        st, prov = js.get("settings", {}), js.get("provenance", {})
        rows = [(k, st.get(k), _short_source(prov.get(k, "default"))) for k in
                ("pixel_size_a", "voltage_kv", "cs_mm", "dose_per_frame_e_a2",
                 "super_resolution", "gain_reference", "movies_glob", "particle_diameter_a",
                 "symmetry", "picker", "max_ctf_resolution_a", "rank_threshold",
                 "min_particles_3d")]
        parts.append("<h3>Confirmed processing settings</h3>"
                     + _table(rows, ("setting", "value", "from")))
        if js.get("job_options"):
            parts.append("<p class=small>Small-demo job options: " + html.escape(", ".join(
                f"{s}/{j}.{o}={v}" for s, j, o, v in js["job_options"])) + "</p>")
    if not parts:
        return "<p>No session summary in the project.</p>"
    return "\n".join(parts)


def _short_source(src: str) -> str:
    """``metadata: /long/path/file.xml:Field`` -> ``metadata: file.xml:Field``."""
    head, sep, rest = src.partition(": ")
    if sep and "/" in rest:
        return f"{head}: {rest.rsplit('/', 1)[-1]}"
    return src


def _section_ctf(project: Path, figs: _Figures, session: Path | None) -> str:
    plt = _plt()
    d = _scheme_job_dir(project, "prep", "ctffind") or _latest_success(project, "CtfFind")
    mics = _star(d / "micrographs_ctf.star").get("micrographs") if d else None
    if mics is None or len(mics) == 0:
        return "<p>No CTF results yet.</p>"
    n = len(mics)
    x = np.arange(1, n + 1)
    truth = {}
    if session is not None:
        t = _star(session / "ground_truth" / "movies_truth.star").get("movies")
        if t is not None:
            from app.demo import stem_of

            truth = {stem_of(r.rlnMicrographMovieName): r for r in t.itertuples()}
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.4))
    du = mics["rlnDefocusU"].to_numpy(float)
    dv = mics["rlnDefocusV"].to_numpy(float)
    axs[0].plot(x, (du + dv) / 2e4, "o-", label="estimated")
    rows = []
    if truth:
        from app.demo import stem_of

        tv = [truth.get(stem_of(m)) for m in mics["rlnMicrographMovieName"]]
        tm = np.array([(r.rlnDefocusU + r.rlnDefocusV) / 2e4 if r is not None else np.nan
                       for r in tv])
        axs[0].plot(x, tm, "x", color="k", label="simulated truth")
        err = np.abs((du + dv) / 2e4 - tm) * 1e4
        rows.append(("defocus error vs truth (median / max)",
                     f"{np.nanmedian(err):.0f} Å / {np.nanmax(err):.0f} Å"))
    axs[0].set(xlabel="micrograph", ylabel="mean defocus (µm)", title="Defocus")
    axs[0].legend(fontsize=8)
    mr = mics["rlnCtfMaxResolution"].to_numpy(float)
    axs[1].plot(x, mr, "o-", color="C2")
    axs[1].set(xlabel="micrograph", ylabel="Å", title="CTF max resolution")
    mot = mics["rlnAccumMotionTotal"].to_numpy(float) if "rlnAccumMotionTotal" in mics else None
    if mot is not None:
        axs[2].bar(x, mot, color="C1", label="estimated")
        if session is not None:
            tmot = np.array([_true_motion_a(session, m, mics)
                             for m in mics["rlnMicrographMovieName"]])
            if np.isfinite(tmot).any():
                axs[2].plot(x, tmot, "x", color="k", label="simulated truth")
                axs[2].legend(fontsize=8)
        axs[2].set(xlabel="micrograph", ylabel="Å", title="Total motion (drift)")
    fig.tight_layout()
    rows = [("micrographs with CTF", n),
            ("CTF max resolution median (Å)", float(np.median(mr))),
            ("mean defocus range (µm)", f"{du.min() / 1e4:.2f} - {du.max() / 1e4:.2f}"),
            *rows]
    if mot is not None:
        rows.append(("total motion median (Å)", float(np.median(mot))))
    return figs.save(fig, "ctf_drift") + _table(rows)


def _true_motion_a(session: Path, movie: str, mics) -> float:
    """Total global motion (Å) of a simulated movie from ``ground_truth/<stem>_shifts.star``
    (per-frame shifts in pixels, RELION's convention) times the movie pixel size."""
    from app.demo import stem_of

    t = _star(session / "ground_truth" / f"{stem_of(movie)}_shifts.star")
    g = next(iter(t.values()), None) if t else None
    opt = _star(session / "ground_truth" / "movies_truth.star").get("optics")
    if g is None or opt is None or len(g) < 2:
        return float("nan")
    px = float(opt["rlnMicrographOriginalPixelSize"].iloc[0])
    xy = np.c_[g["rlnMicrographShiftX"], g["rlnMicrographShiftY"]].astype(float)
    return float(np.hypot(*np.diff(xy, axis=0).T).sum() * px)


def _section_picks(project: Path, figs: _Figures, session: Path | None) -> str:
    plt = _plt()
    from scipy.ndimage import gaussian_filter

    d = _scheme_job_dir(project, "proc", "autopick") or _latest_success(project, "AutoPick")
    tab = _star(d / "autopick.star").get("coordinate_files") if d else None
    if tab is None or len(tab) == 0:
        return "<p>No picks yet.</p>"
    mic_name = str(tab["rlnMicrographName"].iloc[0])
    coords = _star(project / str(tab["rlnMicrographCoordinates"].iloc[0]))
    c = next(iter(coords.values()), None) if coords else None
    img = _mrc(project / mic_name)
    if img is None or c is None:
        return "<p>Example micrograph not readable.</p>"
    img = gaussian_filter(img.astype(np.float32), 2.0)
    lo, hi = np.percentile(img, [1, 99])
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
    ds = json.loads((project / "demo_settings.json").read_text(encoding="utf-8")) if (
        project / "demo_settings.json").exists() else {}
    px = _mic_pixel(project, mic_name)
    diam = ds.get("settings", {}).get("particle_diameter_a")
    r = 0.5 * diam / px if diam and px else 20
    from matplotlib.patches import Circle

    for xx, yy in zip(c["rlnCoordinateX"], c["rlnCoordinateY"]):
        ax.add_patch(Circle((xx, yy), r, fill=False, color="lime", lw=1))
    n_truth = None
    if session is not None:
        from app.demo import stem_of

        t = _star(session / "ground_truth" / "coordinates_truth.star").get("particles")
        if t is not None:
            sel = t[[stem_of(m) == stem_of(mic_name) for m in t["rlnMicrographMovieName"]]]
            if "scsKind" in sel:
                sel = sel[sel["scsKind"] == "particle"]
            ax.plot(sel["rlnCoordinateX"], sel["rlnCoordinateY"], "+", color="red", ms=6)
            n_truth = len(sel)
    ax.set_title(f"{Path(mic_name).name}: {len(c)} picks (green)"
                 + (f", {n_truth} simulated particles (red +)" if n_truth is not None else ""),
                 fontsize=9)
    ax.axis("off")
    total = sum(len(next(iter(_star(project / str(f)).values()), []))
                for f in tab["rlnMicrographCoordinates"])
    return figs.save(fig, "picks") + _table([("micrographs picked", len(tab)),
                                             ("particles picked", total)])


def _mic_pixel(project: Path, mic_name: str) -> float | None:
    from metadata.images import read_mrc

    try:
        return read_mrc(project / mic_name)[1]
    except Exception:  # noqa: BLE001
        return None


def _section_classes(project: Path, figs: _Figures) -> str:
    plt = _plt()
    d = _scheme_job_dir(project, "proc", "select_parts") or _latest_success(project, "Select")
    ca = _star(d / "class_averages.star") if d else {}
    tab = next(iter(ca.values()), None) if ca else None
    note = ""
    if tab is None or len(tab) == 0:
        tab, d2 = _class2d_model(project)
        if tab is None:
            return "<p>No 2D classes yet.</p>"
        note = (f"<p class=small>No class-ranker output (selection by ranker not run): classes "
                f"of {d2.relative_to(project).as_posix()} sorted by their share of the "
                f"particles.</p>")
    sel = {}
    bs = _star(d / "backup_selection.star")
    bt = next(iter(bs.values()), None) if bs else None
    if bt is not None and "rlnSelected" in bt:
        sel = {i + 1: int(v) for i, v in enumerate(bt["rlnSelected"])}
    score_col = next((c for c in ("rlnPredictedClassScore", "rlnClassScore",
                                  "rlnClassDistribution") if c in tab), None)
    if score_col is None:
        return "<p>2D class table without scores.</p>"
    tab = tab.sort_values(score_col, ascending=False)
    n = len(tab)
    cols = min(8, n)
    rows_n = int(np.ceil(n / cols))
    fig, axs = plt.subplots(rows_n, cols, figsize=(1.6 * cols, 2.0 * rows_n), squeeze=False)
    n_sel = 0
    for ax in axs.ravel():
        ax.axis("off")
    for ax, r in zip(axs.ravel(), tab.itertuples()):
        img = _image_ref(r.rlnReferenceImage, project)
        k = int(getattr(r, "rlnClassNumber", 0) or int(str(r.rlnReferenceImage).split("@")[0]))
        s = float(getattr(r, score_col))
        chosen = sel.get(k, 0) == 1
        n_sel += chosen
        if img is not None:
            ax.imshow(img, cmap="gray")
        dist = getattr(r, "rlnClassDistribution", None)
        score = "unscored" if s <= -998 else f"{s:.2f}"  # the ranker's -999: empty class
        ax.set_title(f"#{k} {score}" + (f" ({100 * dist:.0f}%)" if dist is not None else ""),
                     fontsize=7, color="green" if chosen else "gray")
        for sp in ax.spines.values():
            sp.set_visible(True)
            sp.set_color("lime" if chosen else "lightgray")
            sp.set_linewidth(3 if chosen else 1)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("2D classes sorted by ranker score (green frame: selected)" if not note else
                 "2D classes sorted by their share of the particles (no ranker scores)",
                 fontsize=9)
    fig.tight_layout()
    parts = _star(d / "particles.star").get("particles") if d else None
    rows = [("classes", n), ("classes selected", n_sel if not note else "all (no ranker)"),
            ("particles selected", None if parts is None else len(parts)),
            ("selection job", d.relative_to(project).as_posix() if d else "-")]
    return note + figs.save(fig, "classes") + _table(rows)


def _class2d_model(project: Path):
    """(model_classes table, job dir) of the newest finished Class2D job's last iteration."""
    d = _latest_success(project, "Class2D")
    if d is None:
        return None, None
    models = sorted(d.glob("run_it[0-9][0-9][0-9]_model.star"))
    if not models:
        return None, None
    t = _star(models[-1]).get("model_classes")
    return (t, d) if t is not None and len(t) else (None, None)


def _slices(vol: np.ndarray) -> list[np.ndarray]:
    c = np.array(vol.shape) // 2
    return [vol[c[0]], vol[:, c[1]], vol[:, :, c[2]]]


def _section_maps(project: Path, figs: _Figures, truth: dict | None) -> str:
    plt = _plt()
    items = []
    d_ini = _scheme_job_dir(project, "proc", "inimodel3d") or _latest_success(
        project, "InitialModel")
    if d_ini and (d_ini / "initial_model.mrc").exists():
        items.append(("initial model", d_ini / "initial_model.mrc"))
    d_ref = _scheme_job_dir(project, "proc", "refine3d") or _latest_success(project, "Refine3D")
    if d_ref and (d_ref / "run_class001.mrc").exists():
        items.append(("refined map", d_ref / "run_class001.mrc"))
    if not items:
        return "<p>No 3D maps yet (initial model / refinement not run or not finished).</p>"
    fig, axs = plt.subplots(len(items), 4, figsize=(11, 2.9 * len(items)), squeeze=False)
    for row, (title, path) in zip(axs, items):
        vol = _mrc(path)
        if vol is None:
            continue
        for ax, sl, name in zip(row, _slices(vol), ("z", "y", "x")):
            ax.imshow(sl, cmap="gray")
            ax.set_title(f"{title}: central slice ⊥{name}", fontsize=8)
            ax.axis("off")
        row[3].imshow(vol.sum(0), cmap="gray")
        row[3].set_title(f"{title}: projection along z", fontsize=8)
        row[3].axis("off")
    fig.tight_layout()
    rows = [(t, p.relative_to(project).as_posix()) for t, p in items]
    return figs.save(fig, "maps") + _table(rows)


def _fsc_from_model(path: Path) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(resolution 1/Å, FSC, label) from a RELION-style run_model.star."""
    blocks = _star(path)
    for name, t in blocks.items():
        if not hasattr(t, "columns"):
            continue
        fcol = next((c for c in ("rlnGoldStandardFsc", "rlnFourierShellCorrelation",
                                 "rlnFourierShellCorrelationCorrected") if c in t.columns), None)
        if fcol is None:
            continue
        if "rlnResolution" in t.columns:
            x = t["rlnResolution"].to_numpy(float)
        elif "rlnAngstromResolution" in t.columns:
            a = t["rlnAngstromResolution"].to_numpy(float)
            x = np.where(a > 0, 1.0 / np.maximum(a, 1e-9), 0.0)
        else:
            continue
        return x, t[fcol].to_numpy(float), f"{fcol} ({path.name}, {name})"
    return None


def _section_fsc(project: Path, figs: _Figures, truth: dict | None) -> str:
    plt = _plt()
    curves = []
    d_ref = _scheme_job_dir(project, "proc", "refine3d") or _latest_success(project, "Refine3D")
    if d_ref:
        got = _fsc_from_model(d_ref / "run_model.star")
        if got:
            curves.append(("half maps (gold standard)",) + got[:2])
    rows = []
    for key, label in (("refine3d", "refined map vs simulated molecule"),
                       ("inimodel3d", "initial model vs simulated molecule")):
        t = (truth or {}).get(key)
        if t and t.get("fsc"):
            f = np.asarray(t["fsc"], float)
            x = np.arange(len(f)) / (t["box"] * t["pixel_a"])
            curves.append((label, x, f))
            rows.append((f"{label}: FSC 0.5", f"{t['resolution_fsc05_a']:.1f} Å"
                         if t.get("resolution_fsc05_a") else "-"))
            rows.append((f"{label}: target (2 x Nyquist)", f"{t['target_a']:.1f} Å"))
    if not curves:
        return "<p>No FSC curve yet.</p>"
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for label, x, f in curves:
        ax.plot(x, f, label=label)
    ax.axhline(0.143, color="gray", ls=":", lw=1)
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    ax.set(xlabel="resolution (1/Å)", ylabel="FSC", ylim=(-0.1, 1.05), title="FSC")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figs.save(fig, "fsc") + (_table(rows) if rows else "")


_FINISHED_RE = re.compile(r"job finished in (\d+):(\d\d):(\d\d)")


def job_wall_times(project: Path) -> list[tuple[str, str, float | None, int]]:
    """(job dir, state, wall seconds summed over runs, number of runs) for every job."""
    out = []
    for d in sorted(project.glob("*/job[0-9][0-9][0-9]")):
        if not (d / "job.star").exists():
            continue
        state = next((s for m, s in (("RELION_JOB_EXIT_SUCCESS", "success"),
                                     ("RELION_JOB_EXIT_FAILURE", "failure"),
                                     ("RELION_JOB_EXIT_ABORTED", "aborted"))
                      if (d / m).exists()), "running")
        secs, runs = None, 0
        try:
            text = (d / "run.out").read_text(encoding="utf-8", errors="replace")
            found = _FINISHED_RE.findall(text)
            if found:
                runs = len(found)
                secs = float(sum(int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in found))
        except OSError:
            pass
        if secs is None and state != "running":
            marker = next(d.glob("RELION_JOB_EXIT_*"))
            secs = marker.stat().st_mtime - (d / "job.star").stat().st_mtime
            runs = 1
        out.append((d.relative_to(project).as_posix(), state, secs, runs))
    return out


def _section_jobs(project: Path, figs: _Figures) -> str:
    plt = _plt()
    rows = job_wall_times(project)
    if not rows:
        return "<p>No jobs.</p>"
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1))
    names = [r[0] for r in rows]
    vals = [r[2] or 0 for r in rows]
    colors = ["C2" if r[1] == "success" else "C3" if r[1] == "failure" else "C7" for r in rows]
    ax.barh(names[::-1], vals[::-1], color=colors[::-1])
    ax.set(xlabel="wall time (s)", title="Per-job wall time (all runs of the job summed)")
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    total = sum(v for v in vals)
    table = _table([(n, s, _hms(t), k) for n, s, t, k in rows]
                   + [("all jobs", "", _hms(total), "")], ("job", "state", "wall", "runs"))
    return figs.save(fig, "job_times") + table


def _section_live(figs: _Figures, timeline: dict | None) -> str:
    if not timeline:
        return ""
    plt = _plt()
    dl: dict[str, list[float]] = {"ctf": [], "class2d": []}
    for rec in timeline.values():
        if "arrival" in rec:
            for k in dl:
                if k in rec:
                    dl[k].append(rec[k] - rec["arrival"])
    if not any(dl.values()):
        return ""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    arrivals = sorted((rec["arrival"], s) for s, rec in timeline.items() if "arrival" in rec)
    t0 = arrivals[0][0] if arrivals else 0.0
    for k, color, label in (("ctf", "C0", "arrival → CTF result"),
                            ("class2d", "C1", "arrival → in a finished 2D classification")):
        pts = [(timeline[s]["arrival"] - t0, timeline[s][k] - timeline[s]["arrival"])
               for _, s in arrivals if k in timeline[s]]
        if pts:
            a = np.array(pts)
            ax.plot(a[:, 0] / 60, a[:, 1] / 60, "o", color=color, label=label)
    ax.set(xlabel="movie arrival (min after the first)", ylabel="delay (min)",
           title="On-the-fly delays")
    ax.legend(fontsize=8)
    fig.tight_layout()
    rows = []
    for k, label in (("ctf", "arrival → CTF"), ("class2d", "arrival → 2D")):
        v = dl[k]
        if v:
            rows.append((label, len(v), _hms(float(np.median(v))), _hms(float(np.max(v)))))
    return figs.save(fig, "live_delays") + _table(rows, ("delay", "movies", "median", "max"))


_CSS = """
body { font-family: sans-serif; max-width: 1150px; margin: 1em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
img.fig { max-width: 100%; display: block; margin: 0.4em 0; }
.ok { color: #080; font-weight: bold; } .bad { color: #b00; font-weight: bold; }
.small { font-size: 0.85em; color: #555; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  var ok = 0;
  imgs.forEach(function (i) { if (i.complete && i.naturalWidth > 0) ok++; });
  document.title = 'report: images ' + ok + '/' + imgs.length + ' loaded';
  var p = document.getElementById('imgcheck');
  if (p) p.textContent = ok + ' of ' + imgs.length + ' figures loaded';
});
"""


def write_report(project: str | Path, out_dir: str | Path, *, session: str | Path | None = None,
                 truth: dict | None = None, timeline: dict | None = None,
                 demo_wall_s: float | None = None) -> Path:
    """Write ``out_dir/report.html`` (+ the PNGs) for ``project``; returns the HTML path.

    Sections whose inputs do not exist yet say so instead of failing, so the report can be
    written at any point of a run.
    """
    project = Path(project).resolve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = _Figures(out)
    sess = Path(session).resolve() if session is not None else None
    sections = []

    def add(title: str, fn, *a) -> None:
        try:
            body = fn(*a)
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the report
            log.exception("report section %s", title)
            body = f"<p class=bad>This section could not be drawn: {html.escape(str(exc))}</p>"
        if body:
            sections.append(f"<h2>{html.escape(title)}</h2>\n{body}")

    add("Acquisition", _section_acquisition, project, sess)
    add("CTF and drift", _section_ctf, project, figs, sess)
    add("Picks on an example micrograph", _section_picks, project, figs, sess)
    add("2D classes and selection", _section_classes, project, figs)
    add("3D: initial model and refined map", _section_maps, project, figs, truth)
    add("FSC", _section_fsc, project, figs, truth)
    add("Per-job wall times", _section_jobs, project, figs)
    add("On-the-fly delays", _section_live, figs, timeline)

    verdict = ""
    if truth and truth.get("resolution_fsc05_a"):
        r, tgt = truth["resolution_fsc05_a"], truth.get("target_a")
        good = tgt is not None and r <= tgt
        verdict = (f"<p class={'ok' if good else 'bad'}>Refined map vs the simulated molecule: "
                   f"FSC = 0.5 at {r:.1f} Å (target: {tgt:.1f} Å or better, 2 × Nyquist of the "
                   f"down-scaled particles) — {'PASS' if good else 'FAIL'}</p>")
    elif truth is not None:
        verdict = "<p class=bad>No refined map to compare with the simulated molecule.</p>"
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"<h1>scopeside report</h1><p>Project <code>{html.escape(str(project))}</code>"
            f"<br>written {now}"
            + (f"<br>demo wall time {_hms(demo_wall_s)}" if demo_wall_s is not None else "")
            + "</p>" + verdict + "<p class=small id=imgcheck></p>")
    page = (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>scopeside report</title><style>{_CSS}</style>"
            f"<script>{_SCRIPT}</script></head><body>\n{head}\n" + "\n".join(sections)
            + "\n</body></html>\n")
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
