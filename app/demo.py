"""``scopeside demo``: a simulated session processed end to end by the real prep and proc schemes.

Steps (each one resumable: run the demo again with the same ``--out`` and it continues):

1. **simulate** an EPU (or SerialEM) session with movies and ground truth into
   ``<out>/session`` (:mod:`app.simulation.session`); with ``live`` the movies appear one by
   one at a microscope-like rate while everything below already runs;
2. **confirm the settings** as the setup form does: read the session back with
   :func:`metadata.session.read_any` (pixel size, voltage, Cs, dose...) and add the operator's
   values (particle diameter, symmetry, picker, CTF limit, 3D threshold) ->
   :class:`app.schemes.relion_it.ProcessingSettings`, recorded in ``<project>/demo_settings.json``;
3. **create the project** ``<out>/project`` (``Movies`` links to the session) with
   :func:`app.schemes.api.create_project`, then the small-demo job options (fewer 2D classes and
   mini-batches, fewer initial-model iterations, smaller CTF tiles) via ``set_job_option``;
4. **run prep, then proc** with :class:`app.schemes.Schemer` and the local executor (each job a
   child process, as in production). The schemes loop forever (``WAIT`` nodes); the demo stops
   prep at its ``WAIT`` once every movie has a CTF result and proc at its ``WAIT`` once a
   refine3d job has succeeded (a stop event = the scheme's abort, taken while it sleeps, so
   no job is interrupted). With ``live`` both schemes run at once, as on the microscope;
5. **report**: ``<out>/report/report.html`` (:mod:`app.report`) and a comparison of the refined
   map with the simulated molecule (FSC against the truth after aligning the two maps).

Killing the demo leaves the running job (its own process group) to finish; the next run
re-adopts it through the schemer's resume logic.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from app.errors import UserError

log = logging.getLogger("scopeside.demo")

DEMO_DIR = ".demo"  # inside the project: demo state (settings, timeline, markers)
PREP_JOBS = ("importmovies", "motioncorr", "ctffind")
PROC_JOBS = ("select_mics", "autopick", "extract", "class2d", "select_parts", "inimodel3d",
             "refine3d")


@dataclass
class DemoConfig:
    """What the demo simulates and how it processes it (defaults: the README's demo)."""

    out: Path = Path("scopeside-demo")
    n_movies: int = 16
    software: str = "epu"  # epu | serialem
    live: bool = False
    interval_s: float = 15.0  # live: seconds between movies
    shape: int = 1024  # movie frames are shape x shape pixels
    n_frames: int = 8
    pixel_size_a: float = 2.0
    dose_per_frame_e_a2: float = 5.0
    molecule: str = "asym"
    particles_per_movie: int | None = 110
    #: particle phase contrast (simulator's dV, volts; 2 = its default): 4 makes a 57 kDa
    #: particle as visible as a larger complex, so LoG picking finds most of them
    protein_contrast_v: float = 4.0
    defocus_um: tuple[float, float] = (1.0, 2.2)
    nr_classes: int = 12
    nr_iter_grad: int = 60
    inimodel_iter: int = 120
    min_particles_3d: int | None = None  # None: 1 (prep first) or ~half the truth (live)
    seed: int = 7
    stop_after: str = "refine3d"  # the last job wanted (tests may stop earlier)
    report: bool = True
    progress: bool = True
    gui: bool = False  # open the GUI monitor (``scopeside gui --project``) once the project exists


@dataclass
class DemoResult:
    out: Path
    project: Path
    session: Path
    state: str  # finished | incomplete
    message: str
    wall_s: float
    report: Path | None = None
    truth: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ helpers


def _demo_dir(project: Path) -> Path:
    d = project / DEMO_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d


def _read_json(p: Path, default):
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return default


def _write_json(p: Path, data) -> None:
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def stem_of(name: str) -> str:
    """The acquisition's stem shared by movie, micrograph and CTF names."""
    base = Path(str(name).split(":")[0]).name
    for suf in ("_fractions.tiff", "_Fractions.mrc", "_EER.eer", "_fractions.mrc",
                ".tiff", ".tif", ".mrc", ".eer", ".mrcs"):
        if base.endswith(suf):
            return base[: -len(suf)]
    return base.rsplit(".", 1)[0]


def _epu_layout(n: int) -> tuple[int, int, int]:
    """(grid squares, holes per square, shots per hole) giving exactly ``n`` movies."""
    shots = 2 if n % 2 == 0 else 1
    holes = n // shots
    squares = 2 if holes % 2 == 0 and holes >= 8 else 1
    return squares, holes // squares, shots


# ------------------------------------------------------------------------------ 1. simulate


def session_spec(cfg: DemoConfig):
    from app.simulation.session import SessionSpec

    kw: dict = {"molecules": (cfg.molecule,), "protein_contrast_v": cfg.protein_contrast_v}
    if cfg.particles_per_movie:
        kw["n_particles"] = int(cfg.particles_per_movie)
    return SessionSpec(
        shape=(cfg.shape, cfg.shape), n_frames=cfg.n_frames, pixel_size_a=cfg.pixel_size_a,
        dose_per_frame_e_a2=cfg.dose_per_frame_e_a2, defocus_um=cfg.defocus_um,
        astigmatism_a=(0.0, 300.0), drift_px=(2.0, 8.0), local_px=1.0, carbon_fraction=0.0,
        max_aggregates=1, max_ice_blobs=0, n_hot=5, n_dead=5, seed=cfg.seed, movie_kw=kw)


def simulate_session(cfg: DemoConfig, session: Path, done_marker: Path,
                     say: Callable[[str], None]) -> None:
    """Write the session (all at once, or dripped with ``cfg.live``); idempotent."""
    from app.simulation.session import write_epu_session_sim, write_serialem_session_sim

    if done_marker.exists():
        return
    spec = session_spec(cfg)
    t0 = time.monotonic()

    def progress(i: int, n: int) -> None:
        say(f"simulating movie {i}/{n} ({time.monotonic() - t0:.0f} s)")

    if not cfg.live and session.exists():
        shutil.rmtree(session)  # a half-written session from a killed run: start it again
    interval = cfg.interval_s if cfg.live else 0.0
    cmd = f"scopeside demo --movies {cfg.n_movies} --software {cfg.software}"
    if cfg.software == "epu":
        sq, holes, shots = _epu_layout(cfg.n_movies)
        write_epu_session_sim(session, spec, n_grid_squares=sq, holes_per_square=holes,
                              shots_per_hole=shots, interval_s=interval, command=cmd,
                              progress=progress)
    else:
        write_serialem_session_sim(session, spec, n_movies=cfg.n_movies, interval_s=interval,
                                   command=cmd, progress=progress)
    done_marker.write_text(f"{time.time()}\n", encoding="utf-8")


# ------------------------------------------------------------------------------ 2. settings


def movies_glob(session: Path, movie_path: str | None, software: str) -> str:
    """The import glob (under the project's ``Movies`` link to the session) for every movie."""
    if software == "serialem" or not movie_path:
        suffix = Path(movie_path).suffix if movie_path else ".tif"
        return f"Movies/*{suffix}"
    rel = Path(movie_path).resolve().relative_to(session.resolve())
    parts = ["GridSquare_*" if p.startswith("GridSquare_") else
             "Images-Disc*" if p.startswith("Images-Disc") else p for p in rel.parts[:-1]]
    for suf in ("_fractions.tiff", "_Fractions.mrc", "_EER.eer"):
        if rel.name.endswith(suf):
            return "/".join(["Movies", *parts, "*" + suf])
    return "/".join(["Movies", *parts, "*" + rel.suffix])


def confirm_settings(cfg: DemoConfig, session: Path, n_truth_particles: int):
    """Read the session's metadata back and fill in the operator's values, as the setup form.

    Returns ``(ProcessingSettings, provenance)`` where provenance maps each value to where it
    came from (``metadata: <source>``, ``operator``, ``site default``).
    """
    from app.schemes.relion_it import ProcessingSettings
    from compute.simulate.molecules import molecule
    from metadata.config import load_instruments
    from metadata.session import read_any

    res = read_any(session, cfg=load_instruments())
    rec = res.record
    if rec is None:
        raise UserError(f"{session}: no movie with metadata found in the simulated session")
    src = dict(rec.source or {})
    prov: dict[str, str] = {}
    values: dict = {}
    for key in ("pixel_size_a", "voltage_kv", "cs_mm", "dose_per_frame_e_a2",
                "super_resolution"):
        v = getattr(rec, key, None)
        if v is not None:
            values[key] = v
            prov[key] = f"metadata: {src.get(key, 'record')}"
    if values.get("cs_mm") is None:
        values["cs_mm"] = 2.7
        prov["cs_mm"] = "operator (not in the metadata)"
    if values.get("dose_per_frame_e_a2") is None and rec.total_dose_e_a2 and rec.n_frames:
        values["dose_per_frame_e_a2"] = rec.total_dose_e_a2 / rec.n_frames
        prov["dose_per_frame_e_a2"] = "metadata: total dose / frames"
    missing = [k for k in ("pixel_size_a", "voltage_kv", "dose_per_frame_e_a2")
               if values.get(k) is None]
    if missing:
        raise UserError(f"{session}: the metadata lacks {', '.join(missing)}")
    if rec.gain_reference:
        from metadata.config import locate_gain_reference

        g, _, _ = locate_gain_reference(rec.gain_reference, movie_path=rec.movie_path,
                                        session_dir=session)
        if g is not None:
            values["gain_reference"] = g
            prov["gain_reference"] = f"metadata: {src.get('gain_reference', 'record')}"
    if "gain_reference" not in values:
        for cand in (session / "gain_reference.mrc", *session.glob("CountRef_*.mrc"),
                     *session.glob("CountRef_*.dm4")):
            if cand.exists():
                values["gain_reference"] = cand.resolve()
                prov["gain_reference"] = "operator (file in the session folder)"
                break
    mol = molecule(cfg.molecule)
    live_min = max(1, int(0.5 * n_truth_particles)) if cfg.live else 1
    operator = {
        "particle_diameter_a": float(round(mol.diameter_a / 5.0) * 5.0),
        "symmetry": mol.symmetry,
        "picker": "log",
        "max_ctf_resolution_a": 25.0,
        "min_particles_3d": cfg.min_particles_3d if cfg.min_particles_3d is not None
        else live_min,
        "rank_threshold": 0.15,
        "wait_sec": 2.0,
        "do_at_most": 50,
        "nr_threads": 1,
        "movies_glob": movies_glob(session, rec.movie_path, cfg.software),
    }
    for k, v in operator.items():
        values[k] = v
        prov[k] = "operator"
    return ProcessingSettings(**values), prov, rec


# ------------------------------------------------------------------------------ 3. project


def ranker_weights() -> Path:
    """The shipped class-ranker weights (``resources/ranker/ranker.pt``)."""
    return Path(__file__).resolve().parents[1] / "resources" / "ranker" / "ranker.pt"


def demo_job_options(cfg: DemoConfig) -> list[tuple[str, str, str, str]]:
    """(scheme, job, option, value): the small-demo settings on top of relion_it's."""
    it = int(cfg.nr_iter_grad)
    return [
        ("prep", "motioncorr", "patch_x", "3"), ("prep", "motioncorr", "patch_y", "3"),
        ("prep", "ctffind", "box", "256"), ("prep", "ctffind", "dfmin", "5000"),
        ("prep", "ctffind", "dfmax", "35000"), ("prep", "ctffind", "resmax", "6"),
        ("proc", "class2d", "nr_classes", str(cfg.nr_classes)),
        ("proc", "class2d", "nr_iter_grad", str(it)),
        ("proc", "select_parts", "fn_model", f"Schemes/proc/class2d/run_it{it:03d}_optimiser.star"),
        *([] if ranker_weights().exists() else [
            # no class-ranker weights in this checkout: keep every particle (logged, reported)
            ("proc", "select_parts", "do_class_ranker", "No"),
            ("proc", "select_parts", "do_select_values", "Yes"),
            ("proc", "select_parts", "fn_data", f"Schemes/proc/class2d/run_it{it:03d}_data.star"),
            ("proc", "select_parts", "select_label", "rlnClassNumber"),
            ("proc", "select_parts", "select_minval", "-9999"),
            ("proc", "select_parts", "select_maxval", "9999")]),
        ("proc", "inimodel3d", "nr_iter", str(cfg.inimodel_iter)),
        ("proc", "inimodel3d", "nr_classes", "1"),
    ]


def make_project(cfg: DemoConfig, project: Path, session: Path, settings) -> None:
    from app.schemes import api

    if (project / "Schemes" / "proc" / "scheme.star").exists():
        for scheme, job, opt, value in demo_job_options(cfg):  # unchanged values: no-ops
            api.set_job_option(project, scheme, job, opt, value)
        return
    if (project / "Schemes").exists():
        shutil.rmtree(project / "Schemes")  # killed while creating it: create it again
    project.mkdir(parents=True, exist_ok=True)
    link = project / "Movies"
    if not link.exists():
        link.symlink_to(os.path.relpath(session.resolve(), project.resolve()),
                        target_is_directory=True)
    api.create_project(project, settings)
    if not ranker_weights().exists():
        log.warning("%s missing: select_parts keeps all particles instead of ranking classes",
                    ranker_weights())
    for scheme, job, opt, value in demo_job_options(cfg):
        api.set_job_option(project, scheme, job, opt, value)


# ------------------------------------------------------------------------------ 4. schemes


class SchemeThread:
    """One scheme run by :class:`app.schemes.Schemer` in a thread, with a stop rule checked at
    every ``WAIT`` node (the stop event is then taken while the scheme sleeps)."""

    def __init__(self, project: Path, name: str, done: Callable[[], bool], marker: Path,
                 on_event: Callable | None = None,
                 stalled: Callable[[SchemeThread], str] | None = None):
        self.project, self.name, self.done, self.marker = project, name, done, marker
        self.stalled = stalled
        self.stall_message = ""
        self.waits_since_job = 0  # WAIT visits since the last job started
        self.stop = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self.node = ""
        self.on_event = on_event
        self.thread = threading.Thread(target=self._run, name=f"schemer-{name}", daemon=True)

    def _event(self, ev) -> None:
        if ev.kind == "node":
            self.node = ev.node
            if ev.node == "WAIT":
                self.waits_since_job += 1
            if ev.node == "WAIT" and self.done():
                self.stop.set()
            elif ev.node == "WAIT" and self.stalled is not None:
                why = self.stalled(self)
                if why:
                    self.stall_message = why
                    self.stop.set()
        elif ev.kind == "job_started":
            self.waits_since_job = 0
        if self.on_event is not None:
            self.on_event(self.name, ev)

    def _run(self) -> None:
        from app.executors import make_executor
        from app.schemes import Schemer

        try:
            self.result = Schemer(self.project, self.name, make_executor("local"),
                                  on_event=self._event, input_wait_s=120.0).run(self.stop)
        except BaseException as exc:  # reported by the caller
            self.error = exc
            return
        if self.result.state == "aborted" and self.stop.is_set() and self.done():
            # our stop rule: the wanted work is done (marker read by the other scheme's rule)
            self.marker.write_text(f"{time.time()}\n", encoding="utf-8")

    def start(self) -> SchemeThread:
        self.thread.start()
        return self

    def alive(self) -> bool:
        return self.thread.is_alive()


def _job_state(project: Path, scheme: str, job: str) -> tuple[str, str]:
    """(state, job dir) of a scheme job from its scheme.star (without locking)."""
    from app.jobs.base import exit_status
    from app.schemes.model import Scheme

    try:
        sch = Scheme.load(project, scheme, validate=False)
    except (UserError, OSError):
        return "not started", ""
    j = sch.jobs.get(job)
    if j is None or "/" not in j.current_name:
        return "not started", ""
    return (exit_status(project / j.current_name) or "running"), j.current_name


def _count_rows(star: Path, table: str) -> list[str]:
    from metadata.star import read_star

    if not star.is_file():
        return []
    try:
        blocks = read_star(star)
    except Exception as exc:  # noqa: BLE001 - a file being replaced; next poll reads it
        log.debug("%s: %s", star, exc)
        return []
    t = blocks.get(table)
    if t is None or len(t) == 0:
        return []
    col = "rlnMicrographMovieName" if "rlnMicrographMovieName" in t.columns else (
        "rlnMicrographName")
    return [str(v) for v in t[col]]


def ctf_done_stems(project: Path) -> set[str]:
    state, jd = _job_state(project, "prep", "ctffind")
    if not jd:
        return set()
    return {stem_of(n) for n in _count_rows(project / jd / "micrographs_ctf.star", "micrographs")}


# ------------------------------------------------------------------------------ progress


_ETA_RE = re.compile(r"(?:^|\n)(?:\d\d:\d\d:\d\d )?(?P<what>[^\n]*?) ?(\d+)/(\d+) \((\d+)%\)"
                     r"[^\n]*?(?:elapsed (?P<el>\d+:\d\d:\d\d), )?ETA (\d+):(\d\d):(\d\d)")

#: nominal seconds of each stage for the default demo on an idle 2-core machine (ETA model)
#: (measured 2026-12: motioncorr done at ~0:57 incl. simulation, class2d 78 s, inimodel3d 118 s
#: with 120 mini-batches, refine3d 130 s)
NOMINAL_S = {"simulate": 40.0, "importmovies": 3.0, "motioncorr": 40.0, "ctffind": 15.0,
             "select_mics": 3.0, "autopick": 20.0, "extract": 10.0, "class2d": 80.0,
             "select_parts": 8.0, "inimodel3d": 120.0, "refine3d": 130.0}


def job_progress(project: Path, job_dir: str) -> str:
    """``12/16 (75%) ETA 0:00:20`` from the last progress line of a running job's run.out."""
    p = project / job_dir / "run.out"
    try:
        with open(p, "rb") as fh:
            fh.seek(max(0, p.stat().st_size - 4000))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    found = list(_ETA_RE.finditer(tail))
    if not found:
        return ""
    m = found[-1]
    g = m.groups()
    what = (m.group("what") or "").strip()
    if what.startswith("iteration"):
        # an auto-refine iteration: its ETA is that iteration's, not the job's (the number
        # of iterations is not known in advance), so it is not shown as one
        return f"{what} {g[1]}/{g[2]} ({g[3]}%) elapsed {m.group('el') or '?'}"
    return f"{g[1]}/{g[2]} ({g[3]}%) ETA {g[5]}:{g[6]}:{g[7]}"


class Progress:
    """Terminal progress: one line rewritten in place on a TTY, a line every 15 s otherwise."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self.last = ""
        self.last_print = 0.0
        self.done_stages: list[str] = []
        self.stage_start: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        """A permanent line (a step finished, a warning)."""
        if not self.enabled:
            return
        if self.tty and self.last:
            self.stream.write("\r\033[K")
        self.stream.write(f"[{_hms(self.elapsed())}] {msg}\n")
        self.stream.flush()
        self.last = ""

    def status(self, msg: str) -> None:
        """The changing status line."""
        if not self.enabled:
            return
        line = f"[{_hms(self.elapsed())}] {msg}"
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
            self.stream.flush()
            self.last = line
        elif time.monotonic() - self.last_print > 15 or msg != self.last:
            if time.monotonic() - self.last_print > 15:
                self.stream.write(line + "\n")
                self.stream.flush()
                self.last_print = time.monotonic()
            self.last = msg

    def eta(self, remaining: list[str], current_eta_s: float | None) -> float:
        """Remaining seconds: the running job's own ETA plus nominal times of the stages still
        to come, scaled by how fast the finished stages went against their nominal times."""
        rest = sum(NOMINAL_S.get(s, 10.0) for s in remaining) * self.speed()
        return rest + (current_eta_s or 0.0)

    def speed(self) -> float:
        """Wall time of the finished stages over their nominal times (0.3-10)."""
        done_nominal = sum(NOMINAL_S.get(s, 10.0) for s in self.done_stages)
        speed = (self.elapsed() / done_nominal) if done_nominal > 30 else 1.0
        return min(max(speed, 0.3), 10.0)


def _hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _elapsed_seconds(prog: str) -> float | None:
    m = re.search(r"elapsed (\d+):(\d\d):(\d\d)", prog)
    if not m:
        return None
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3))


def _eta_seconds(prog: str) -> float | None:
    m = re.search(r"ETA (\d+):(\d\d):(\d\d)", prog)
    if not m:
        return None
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3))


# ------------------------------------------------------------------------------ timeline (live)


class Timeline:
    """Per acquisition: when its movie arrived, got a CTF result, reached a finished 2D run.

    Kept in ``<project>/.demo/timeline.json`` (wall-clock epoch seconds) so a resumed run
    keeps the earlier figures."""

    def __init__(self, project: Path):
        self.path = _demo_dir(project) / "timeline.json"
        self.data: dict[str, dict[str, float]] = _read_json(self.path, {})
        self.lock = threading.Lock()
        self.seen_class2d: set[str] = set()

    def mark(self, stem: str, what: str, t: float | None = None) -> None:
        with self.lock:
            rec = self.data.setdefault(stem, {})
            if what not in rec:
                rec[what] = time.time() if t is None else t

    def save(self) -> None:
        with self.lock:
            _write_json(self.path, self.data)

    def update(self, project: Path) -> None:
        """Record CTF results and finished 2D classifications that appeared since the last call."""
        for s in ctf_done_stems(project):
            self.mark(s, "ctf")
        for d in sorted((project / "Class2D").glob("job*")):
            if d.name in self.seen_class2d or not (d / "RELION_JOB_EXIT_SUCCESS").exists():
                continue
            self.seen_class2d.add(d.name)
            t_end = (d / "RELION_JOB_EXIT_SUCCESS").stat().st_mtime
            from app.schemes.jobstar import read_job_star

            try:
                fn = read_job_star(d / "job.star").options.get("fn_img", "")
            except (OSError, UserError, ValueError):
                continue
            for name in _count_rows(project / fn, "particles") if fn else []:
                self.mark(stem_of(name), "class2d", t_end)
        self.save()

    def delays(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"ctf": [], "class2d": []}
        for rec in self.data.values():
            if "arrival" in rec:
                for k in out:
                    if k in rec:
                        out[k].append(rec[k] - rec["arrival"])
        return out


def start_watcher(cfg: DemoConfig, session: Path, project: Path, timeline: Timeline,
                  stop: threading.Event) -> threading.Thread:
    """The project's movie watcher (metadata.watcher) records each movie's arrival time."""
    from metadata.watcher import MovieWatcher, epu_metadata_for

    meta = epu_metadata_for(session) if cfg.software == "epu" else (
        lambda m: m.with_name(m.name + ".mdoc"))
    w = MovieWatcher(session, _demo_dir(project) / "watcher_movies.txt", stable_s=1.0,
                     poll_interval_s=1.0, metadata_for=meta, rescan_interval_s=5.0)

    def on_movies(batch: list[Path]) -> None:
        now = time.time()
        for p in batch:
            timeline.mark(stem_of(p.name), "arrival", now - w.stable_s)
        timeline.save()

    def run() -> None:
        with w:
            w.run(on_movies, stop, interval_s=0.5)

    t = threading.Thread(target=run, name="watcher", daemon=True)
    t.start()
    return t


# ------------------------------------------------------------------------------ main


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run (or continue) the demo in ``cfg.out``; returns what it achieved."""
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    session, project = out / "session", out / "project"
    state_dir = out / DEMO_DIR
    state_dir.mkdir(exist_ok=True)
    _check_same_config(cfg, state_dir / "config.json")
    _setup_logging(state_dir / "demo.log")
    prog = Progress(cfg.progress)
    t_start = time.time()
    prog.say(f"scopeside demo in {out} ({cfg.n_movies} {cfg.software.upper()} movies "
             f"{cfg.shape}x{cfg.shape}x{cfg.n_frames}, {cfg.molecule}, "
             f"{'live' if cfg.live else 'all at once'})")

    sim_marker = state_dir / "session_written"
    sim_thread = None
    sim_error: list[BaseException] = []
    if not sim_marker.exists():
        if cfg.live:
            def sim() -> None:
                try:
                    simulate_session(cfg, session, sim_marker, lambda m: log.info(m))
                except BaseException as exc:  # reported below
                    sim_error.append(exc)
            prog.say(f"simulating {cfg.n_movies} movies; they will arrive every "
                     f"{cfg.interval_s:g} s")
            sim_thread = threading.Thread(target=sim, name="simulate", daemon=True)
            sim_thread.start()
            _wait_first_movie(session, sim_thread, sim_error, prog)
        else:
            simulate_session(cfg, session, sim_marker, prog.status)
            prog.say(f"simulated {cfg.n_movies} movies in {session}")
    prog.done_stages.append("simulate")
    n_truth = _truth_particle_count(session)

    settings, prov, rec = confirm_settings(cfg, session, n_truth)
    from metadata.session import read_any, write_session_summary

    make_project(cfg, project, session, settings)
    res = read_any(session)
    if res.session is not None:
        write_session_summary(project, res.session, res.record)
    _write_json(project / "demo_settings.json",
                {"settings": json.loads(settings.model_dump_json()), "provenance": prov,
                 "demo": {k: (str(v) if isinstance(v, Path) else v)
                          for k, v in asdict(cfg).items()},
                 "job_options": demo_job_options(cfg), "truth_particles": n_truth})
    prog.say(f"settings confirmed: pixel {settings.pixel_size_a:g} Å, {settings.voltage_kv:g} kV, "
             f"Cs {settings.cs_mm:g} mm, {settings.dose_per_frame_e_a2:g} e/Å²/frame (from the "
             f"metadata); diameter {settings.particle_diameter_a:g} Å, {settings.symmetry}, "
             f"LoG picking (operator)")

    if cfg.gui:
        open_gui_monitor(project, prog)
    timeline = Timeline(project)
    watch_stop = threading.Event()
    watcher = start_watcher(cfg, session, project, timeline, watch_stop) if cfg.live else None

    def prep_done() -> bool:
        return sim_marker.exists() and len(ctf_done_stems(project)) >= cfg.n_movies

    def proc_stalled(t: SchemeThread) -> str:
        """Prep has ended and proc keeps passing WAIT without running a job, yet no 3D:
        the particle selection left too few particles (the scheme would wait for ever)."""
        if not prep_marker.exists() or t.waits_since_job < 3:
            return ""
        if _job_state(project, "proc", "inimodel3d")[0] != "not started":
            return ""
        _, jd = _job_state(project, "proc", "select_parts")
        n = len(_count_rows(project / jd / "particles.star", "particles")) if jd else 0
        return (f"proc: {n} particles selected ({jd}), fewer than min_nr_parts_3d "
                f"{settings.min_particles_3d}: 3D was not started")

    def proc_done() -> bool:
        if cfg.live and not prep_marker.exists():
            return False
        st, _ = _job_state(project, "proc", cfg.stop_after)
        return st == "success"

    prep_marker, proc_marker = state_dir / "prep_done", state_dir / "proc_done"
    _job_environment()
    threads: list[SchemeThread] = []
    message = ""
    try:
        if not prep_marker.exists():
            threads.append(SchemeThread(project, "prep", prep_done, prep_marker).start())
        if cfg.live and not proc_marker.exists():
            threads.append(SchemeThread(project, "proc", proc_done, proc_marker,
                                        stalled=proc_stalled).start())
        message = _monitor(cfg, project, threads, prog, timeline, prep_marker, proc_marker,
                           sim_thread, sim_error)
        if not message and not proc_marker.exists():
            proc = SchemeThread(project, "proc", proc_done, proc_marker,
                                stalled=proc_stalled).start()
            message = _monitor(cfg, project, [proc], prog, timeline, prep_marker, proc_marker,
                               None, [])
    finally:
        watch_stop.set()
        if watcher is not None:
            watcher.join(timeout=10)
    timeline.update(project)
    state = "finished" if proc_marker.exists() else "incomplete"
    wall = time.time() - t_start
    total = _read_json(state_dir / "wall.json", {"runs": []})
    import resource

    cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF,
              resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
    total["runs"].append({"started": t_start, "wall_s": wall, "cpu_s": cpu, "state": state,
                          "load_avg_end": os.getloadavg()[0]})
    _write_json(state_dir / "wall.json", total)

    result = DemoResult(out, project, session, state, message, wall)
    try:
        result.truth = compare_with_truth(project, session, cfg)
        _write_json(state_dir / "truth_check.json", result.truth)
    except (UserError, OSError, ValueError) as exc:
        log.warning("no comparison with the truth: %s", exc)
        result.truth = {"error": str(exc)}
    if cfg.report:
        from app.report import write_report

        result.report = write_report(project, out / "report", session=session,
                                     truth=result.truth, timeline=timeline.data,
                                     demo_wall_s=sum(r["wall_s"] for r in total["runs"]))
        prog.say(f"report: {result.report}")
    if state == "finished":
        fsc = result.truth.get("resolution_fsc05_a")
        prog.say(f"demo finished in {_hms(wall)} (CPU {_hms(cpu)} in the demo and its jobs, "
                 f"load average {os.getloadavg()[0]:.1f})"
                 + (f"; refined map vs the simulated molecule: FSC 0.5 at {fsc:.1f} Å"
                    if fsc else ""))
    else:
        prog.say(f"demo incomplete after {_hms(wall)}: {message}")
    return result


def _job_environment() -> None:
    """Jobs run as child processes from the project folder: put this checkout first on their
    PYTHONPATH so they import the same code as the demo (a stale editable install can map
    a package such as ``resources`` as a namespace without its ``__init__``)."""
    repo = str(Path(__file__).resolve().parents[1])
    cur = os.environ.get("PYTHONPATH", "")
    if repo not in cur.split(os.pathsep):
        os.environ["PYTHONPATH"] = repo + (os.pathsep + cur if cur else "")


def open_gui_monitor(project: Path, prog: Progress) -> None:
    """Open the GUI engineer's monitor (``scopeside gui --project``) in its own process: it
    follows the project from its files, so it shows these schemes as they run."""
    import subprocess

    log_path = _demo_dir(project) / "gui.log"
    with open(log_path, "ab") as fh:
        subprocess.Popen([sys.executable, "-m", "app.cli", "gui", "--project", str(project)],
                         stdout=fh, stderr=fh, stdin=subprocess.DEVNULL,
                         cwd=str(Path(__file__).resolve().parents[1]), start_new_session=True)
    prog.say(f"GUI monitor opened for {project} (its messages: {log_path})")


def _check_same_config(cfg: DemoConfig, path: Path) -> None:
    """A second run in the same ``--out`` must simulate the same session."""
    keys = ("n_movies", "software", "shape", "n_frames", "pixel_size_a", "molecule", "seed",
            "particles_per_movie", "dose_per_frame_e_a2", "protein_contrast_v")
    now = {k: getattr(cfg, k) for k in keys}
    old = _read_json(path, None)
    if old is not None and old != json.loads(json.dumps(now)):
        diff = ", ".join(f"{k}: {old.get(k)} -> {now[k]}" for k in keys if old.get(k) != now[k])
        raise UserError(f"{path.parent.parent} holds a demo made with other settings ({diff}); "
                        "use another --out or the same options")
    _write_json(path, now)


def _setup_logging(path: Path) -> None:
    h = logging.FileHandler(path, encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in [x for x in root.handlers if getattr(x, "_scopeside_demo", False)]:
        root.removeHandler(old)
        old.close()
    h._scopeside_demo = True  # type: ignore[attr-defined]
    root.addHandler(h)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def _wait_first_movie(session: Path, th: threading.Thread, err: list, prog: Progress) -> None:
    """Live: the simulator first renders every movie, then drips them; wait for the session
    folder to appear so the metadata can be read."""
    while not list(session.rglob("*.xml")) + list(session.glob("*.mdoc")):
        if err:
            raise err[0]
        if not th.is_alive() and not session.exists():
            raise UserError("the simulator stopped before writing any movie")
        prog.status("simulating the session (movies appear when all are rendered)")
        time.sleep(1.0)
    # the first movie beside its metadata
    while not any(p.suffix in (".tiff", ".tif", ".mrc", ".eer") and not p.name.startswith(".")
                  for p in session.rglob("*")):
        time.sleep(0.5)
    prog.say("the first movie arrived")


def _truth_particle_count(session: Path) -> int:
    from metadata.star import read_star

    p = session / "ground_truth" / "coordinates_truth.star"
    if not p.exists():
        return 0
    t = read_star(p).get("particles")
    return 0 if t is None else int(len(t))


def _monitor(cfg: DemoConfig, project: Path, threads: list[SchemeThread], prog: Progress,
             timeline: Timeline, prep_marker: Path, proc_marker: Path,
             sim_thread, sim_error: list) -> str:
    """Show progress until the threads end; returns an error message ('' when all is well)."""
    stages = ["importmovies", "motioncorr", "ctffind", *PROC_JOBS]
    wanted = stages[: stages.index(cfg.stop_after) + 1]
    last_node: dict[str, str] = {}
    while any(t.alive() for t in threads):
        if sim_error:
            for t in threads:
                t.stop.set()
            raise sim_error[0]
        if cfg.live:
            timeline.update(project)
        parts, cur_eta = [], None
        done = []
        for scheme, jobs in (("prep", PREP_JOBS), ("proc", PROC_JOBS)):
            for j in jobs:
                st, jd = _job_state(project, scheme, j)
                if st == "success":
                    done.append(j)
        for t in threads:
            node = t.node or "-"
            st, jd = _job_state(project, t.name, node) if node not in ("", "-") else ("", "")
            p = job_progress(project, jd) if jd and st == "running" else ""
            if p:
                left = _eta_seconds(p)
                if left is None:  # an iterative job: its nominal time less what it has run
                    left = NOMINAL_S.get(node, 60.0) * prog.speed() - (_elapsed_seconds(p) or 0.0)
                cur_eta = max(cur_eta or 0.0, left, 0.0)
            parts.append(f"{t.name}: {node}" + (f" {jd} {p}" if jd and st == "running" else ""))
            if node != last_node.get(t.name) and node not in ("WAIT", "EXIT_maxtime", "-"):
                last_node[t.name] = node
                if node in PREP_JOBS or node in PROC_JOBS:
                    log.info("%s at %s", t.name, node)
            elif node == "WAIT":
                last_node[t.name] = node
        for j in done:
            if j not in prog.done_stages:
                prog.done_stages.append(j)
                _, jd = _job_state(project, "prep" if j in PREP_JOBS else "proc", j)
                prog.say(f"{j} done ({jd})")
        remaining = [s for s in wanted if s not in done]
        eta = prog.eta([s for s in remaining if not any(t.node == s for t in threads)], cur_eta)
        prog.status(" | ".join(parts) + f" | jobs done {len(done)}/{len(wanted)} | "
                    f"ETA {_hms(eta)}")
        time.sleep(1.0)
    for t in threads:
        t.thread.join()
    msg = ""
    for t in threads:
        if t.error is not None:
            raise t.error
        r = t.result
        if r is None:
            continue
        if t.marker.exists():
            prog.say(f"scheme {t.name}: done, stopped at WAIT")
        elif t.stall_message:
            msg = t.stall_message
            prog.say(msg)
        else:
            msg = f"scheme {t.name} {r.state}: {r.message}"
            prog.say(msg)
    return msg


# ------------------------------------------------------------------------------ truth check


def _load_map(path: Path) -> tuple[np.ndarray, float]:
    from metadata.images import read_mrc

    data, px = read_mrc(path)
    if not px:
        raise UserError(f"{path}: no pixel size in the MRC header")
    return np.asarray(data, dtype=np.float32), float(px)


def truth_map(session: Path, molecule_name: str, box: int, pixel_a: float) -> np.ndarray:
    from compute.simulate.molecules import density_map, molecule

    return np.asarray(density_map(molecule(molecule_name), box, pixel_a), dtype=np.float32)


def align_maps(ref: np.ndarray, mov: np.ndarray, step_deg: float = 15.0
               ) -> tuple[np.ndarray, float]:
    """Rotate/translate (and mirror, if better) ``mov`` onto ``ref``; returns (aligned, cc).

    A global search over rotations (HEALPix grid) on 2x-binned, low-passed maps with the
    translation from the FFT cross-correlation peak, both hands, then a local refinement at
    full size. Reconstructions from projections have an arbitrary orientation and hand.
    """
    from compute.orientations import grid_matrices, local_perturbations, order_for_step
    from compute.symmetry import rotate_volume

    def prep(v, n):
        v = v - v.mean()
        f = np.fft.rfftn(v)
        k = np.sqrt(sum(g ** 2 for g in np.meshgrid(
            np.fft.fftfreq(v.shape[0]), np.fft.fftfreq(v.shape[1]),
            np.fft.rfftfreq(v.shape[2]), indexing="ij")))
        f *= np.exp(-(k / 0.12) ** 2)
        out = np.fft.irfftn(f, v.shape, axes=(0, 1, 2))
        if n > 1:
            s = out.shape[0] // n * n
            out = out[:s, :s, :s].reshape(s // n, n, s // n, n, s // n, n).mean((1, 3, 5))
        return out.astype(np.float32)

    def best_shift(a, b):
        c = np.fft.irfftn(np.fft.rfftn(a) * np.conj(np.fft.rfftn(b)), a.shape, axes=(0, 1, 2))
        idx = np.unravel_index(int(np.argmax(c)), c.shape)
        sh = [i if i <= n // 2 else i - n for i, n in zip(idx, c.shape)]
        return np.array(sh, dtype=float), float(c[idx]) / (np.linalg.norm(a) * np.linalg.norm(b)
                                                           + 1e-12)

    binning = 2 if ref.shape[0] >= 48 else 1
    r_small = prep(ref, binning)
    best = (-2.0, None, False)
    mats = grid_matrices(order_for_step(step_deg * 2))
    for mirror in (False, True):
        m_vol = mov[::-1] if mirror else mov
        m_small = prep(m_vol, binning)
        for R in mats:
            rv = rotate_volume(m_small, R)
            _, cc = best_shift(r_small, rv)
            if cc > best[0]:
                best = (cc, R, mirror)
    _, R0, mirror = best
    m_vol = mov[::-1] if mirror else mov
    r_full = prep(ref, 1)
    m_full = prep(m_vol, 1)
    cur = R0
    cur_cc = -2.0
    for step in (step_deg / 2, step_deg / 4, step_deg / 8):
        pert = local_perturbations(step, 1, full=True)
        cands = [cur @ P for P in pert] if pert.ndim == 3 else [cur]
        for R in cands:
            _, cc = best_shift(r_full, rotate_volume(m_full, R))
            if cc > cur_cc:
                cur_cc, cur = cc, R
    # final joint refinement of rotation (rotation vector) and sub-pixel shift by a simplex on
    # the full-size maps: cubic-spline rotation, exact Fourier shift
    from scipy.optimize import minimize
    from scipy.spatial.transform import Rotation

    sh0, _ = best_shift(prep(ref, 1), prep(rotate_volume(m_vol, cur), 1))
    r_hi = _soft_lowpass(ref, 0.3)
    m_hi = _soft_lowpass(m_vol, 0.3)

    def transform(x, vol, order_=1):
        R = cur @ Rotation.from_rotvec(np.radians(x[:3])).as_matrix()
        return _fourier_shift(rotate_volume(vol, R, order_), x[3:])

    def cost(x):
        a = transform(x, m_hi)
        return -float(np.sum(a * r_hi) / (np.linalg.norm(a) * np.linalg.norm(r_hi) + 1e-12))

    x0 = np.r_[0.0, 0.0, 0.0, sh0]
    opt = minimize(cost, x0, method="Nelder-Mead",
                   options={"xatol": 0.02, "fatol": 1e-6, "maxiter": 400,
                            "initial_simplex": x0 + np.vstack([np.zeros(6),
                                                               np.diag([2.0] * 3 + [0.5] * 3)])})
    out = transform(opt.x, m_vol, 3).astype(np.float32)
    return out, float(-opt.fun)


def _soft_lowpass(v: np.ndarray, k0: float) -> np.ndarray:
    """Gaussian low-pass (1/e at ``k0`` cycles per voxel) of a mean-removed map."""
    f = np.fft.rfftn(v - v.mean())
    k = np.sqrt(sum(g ** 2 for g in np.meshgrid(np.fft.fftfreq(v.shape[0]),
                                                 np.fft.fftfreq(v.shape[1]),
                                                 np.fft.rfftfreq(v.shape[2]), indexing="ij")))
    return np.fft.irfftn(f * np.exp(-(k / k0) ** 2), v.shape, axes=(0, 1, 2)).astype(np.float32)


def _fourier_shift(v: np.ndarray, shift_zyx) -> np.ndarray:
    """``v`` translated by ``shift_zyx`` voxels (periodic, exact sub-voxel)."""
    g = np.meshgrid(np.fft.fftfreq(v.shape[0]), np.fft.fftfreq(v.shape[1]),
                    np.fft.rfftfreq(v.shape[2]), indexing="ij")
    ph = np.exp(-2j * np.pi * sum(gi * si for gi, si in zip(g, shift_zyx)))
    return np.fft.irfftn(np.fft.rfftn(v) * ph, v.shape, axes=(0, 1, 2))


def compare_with_truth(project: Path, session: Path, cfg: DemoConfig) -> dict:
    """FSC of the refined (or else the initial) map against the simulated molecule."""
    from compute.fourier import fourier_shell_correlation, resolution_at_threshold

    out: dict = {}
    for scheme_job, fname in (("refine3d", "run_class001.mrc"),
                              ("inimodel3d", "initial_model.mrc")):
        st, jd = _job_state(project, "proc", scheme_job)
        path = project / jd / fname if jd else None
        if st != "success" or path is None or not path.exists():
            continue
        vol, px = _load_map(path)
        box = vol.shape[0]
        truth = truth_map(session, cfg.molecule, box, px)
        aligned, cc = align_maps(truth, vol)
        curve = np.asarray(fourier_shell_correlation(truth, aligned), dtype=float)
        res = resolution_at_threshold(curve, box, px, 0.5)
        nyq = 2 * px
        out[scheme_job] = {"map": str(path.relative_to(project)), "pixel_a": px, "box": box,
                           "cc": float(cc), "fsc": curve.tolist(),
                           "resolution_fsc05_a": None if res is None or not math.isfinite(res)
                           else float(res), "nyquist_a": nyq, "target_a": 2 * nyq}
    if "refine3d" in out:
        out["resolution_fsc05_a"] = out["refine3d"]["resolution_fsc05_a"]
        out["target_a"] = out["refine3d"]["target_a"]
    return out
