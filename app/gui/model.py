"""Qt-free models behind the GUI: the setup form, the class gallery and the project snapshot.

Nothing here imports Qt, so every rule (validation ranges, box sizes, which classes the
threshold selects, what a click stores) is tested without a display. The widgets in
:mod:`app.gui.setup_window`, :mod:`app.gui.gallery` and :mod:`app.gui.monitor_window`
only render these objects and forward the operator's edits to them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------
# Session setup form
# ------------------------------------------------------------------------------------------

#: field states, in the order the form shows them
OK, DERIVED, MISSING, IMPLAUSIBLE, CONFIRMED = "ok", "derived", "missing", "implausible", "confirmed"


@dataclass
class FormField:
    """One value on the setup form with its provenance and validity.

    ``source`` names the file and key the value came from (``None`` when the operator typed
    it or nothing held it); ``derived`` says how it was computed from other values.
    ``lo``/``hi`` are the plausible range (units in ``unit``); a value outside it must be
    confirmed by the operator before Start.
    """

    key: str
    label: str
    kind: str = "float"  # float | int | bool | str | choice | path
    unit: str = ""
    value: Any = None
    source: str | None = None
    derived: str | None = None
    lo: float | None = None
    hi: float | None = None
    required: bool = True
    choices: tuple[str, ...] = ()
    confirmed: bool = False
    help: str = ""
    error: str | None = None  # text the operator typed that could not be parsed
    is_default: bool = False  # scopeside's default, not yet touched by the operator

    @property
    def state(self) -> str:
        if self.error:
            return IMPLAUSIBLE
        if self.value is None or self.value == "":
            return MISSING if self.required else OK
        if self.kind in ("float", "int") and not self.in_range():
            return CONFIRMED if self.confirmed else IMPLAUSIBLE
        if self.derived and self.source is None:
            return DERIVED
        return OK

    def in_range(self) -> bool:
        v = float(self.value)
        if not math.isfinite(v):
            return False
        return (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)

    @property
    def needs_attention(self) -> bool:
        return self.state in (MISSING, IMPLAUSIBLE)

    def tooltip(self) -> str:
        parts = [self.help] if self.help else []
        if self.source:
            parts.append(f"from {self.source}")
        if self.derived:
            parts.append(f"derived: {self.derived}")
        if self.is_default:
            parts.append("scopeside default")
        elif self.source is None and self.derived is None and self.value not in (None, ""):
            parts.append("entered by the operator")
        if self.lo is not None or self.hi is not None:
            parts.append(f"plausible range {_fmt(self.lo)} – {_fmt(self.hi)} {self.unit}".rstrip())
        if self.error:
            parts.append(self.error)
        return "\n".join(parts)

    def set_text(self, text: str) -> None:
        """Set the value from what the operator typed; a bad number sets :attr:`error`."""
        t = text.strip()
        self.error = None
        self.is_default = False
        self.confirmed = False
        self.source = None
        self.derived = None
        if t == "":
            self.value = None
            return
        try:
            if self.kind == "float":
                self.value = float(t)
            elif self.kind == "int":
                f = float(t)
                if f != int(f):
                    raise ValueError(t)
                self.value = int(f)
            elif self.kind == "bool":
                low = t.lower()
                if low not in ("yes", "no", "true", "false", "1", "0"):
                    raise ValueError(t)
                self.value = low in ("yes", "true", "1")
            elif self.kind == "choice" and self.choices and t not in self.choices:
                raise ValueError(t)
            else:
                self.value = t
        except ValueError:
            self.value = None
            want = {"float": "a number", "int": "a whole number", "bool": "yes or no",
                    "choice": "one of " + ", ".join(self.choices)}.get(self.kind, "text")
            self.error = f"{self.label}: {t!r} is not {want}"

    def short_source(self, width: int = 46) -> str:
        """``file · key`` (file name only) for the form's source column."""
        if self.is_default:
            return "default"
        if self.source:
            where, sep, key = self.source.rpartition(":")
            if sep and ("/" in where or "\\" in where or "." in where):
                text = f"{Path(where).name} · {key}"
            else:
                text = self.source
        elif self.derived:
            text = f"derived: {self.derived}"
        else:
            text = "entered" if self.value not in (None, "") else ""
        return text if len(text) <= width else text[: width - 1] + "…"

    def text(self) -> str:
        if self.value is None:
            return ""
        if isinstance(self.value, bool):
            return "yes" if self.value else "no"
        if isinstance(self.value, float):
            return f"{self.value:g}"
        return str(self.value)


def _fmt(v: float | None) -> str:
    return "…" if v is None else f"{v:g}"


#: acquisition fields (from the session files) then operator fields
ACQUISITION_FIELDS: tuple[tuple, ...] = (
    # key, label, kind, unit, lo, hi, required, help
    ("voltage_kv", "Voltage", "float", "kV", 60, 400, True, "accelerating voltage"),
    ("cs_mm", "Spherical aberration Cs", "float", "mm", 0.0, 10.0, True, ""),
    ("pixel_size_a", "Pixel size", "float", "Å/px", 0.2, 20.0, True,
     "pixel size of the movies as recorded"),
    ("super_resolution", "Super-resolution", "bool", "", None, None, True,
     "movies recorded in super-resolution (motion correction bins by 2)"),
    ("dose_per_frame_e_a2", "Dose per frame", "float", "e⁻/Å²", 0.01, 20.0, True, ""),
    ("total_dose_e_a2", "Total dose", "float", "e⁻/Å²", 1.0, 300.0, False, ""),
    ("n_frames", "Frames", "int", "", 1, 100000, False, "frames (fractions) per movie"),
    ("exposure_time_s", "Exposure time", "float", "s", 0.01, 600.0, False, ""),
    ("detector", "Detector", "str", "", None, None, False, ""),
    ("gain_reference", "Gain reference", "path", "", None, None, False,
     "gain reference file (empty: movies are gain-corrected)"),
    ("mtf_file", "MTF", "path", "", None, None, False, "detector MTF STAR file"),
    ("magnification", "Magnification", "int", "×", 1000, 2_000_000, False, "nominal"),
)

PICKERS = ("LoG", "Topaz")
EXECUTORS = ("local", "slurm")
SYMMETRY_RE = re.compile(r"^(C\d+|D\d+|T|O|I[1-4]?)$", re.IGNORECASE)


def operator_fields() -> list[FormField]:
    return [
        FormField("particle_diameter_a", "Particle diameter", "float", "Å", lo=20, hi=2000,
                  help="longest dimension of the particle"),
        FormField("symmetry", "Symmetry", "str", value="C1",
                  help="point group: C1, C2, D7, T, O, I"),
        FormField("picker", "Picker", "choice", value="LoG", choices=PICKERS),
        FormField("min_particles_3d", "Minimum particles for 3D", "int", value=5000, lo=100,
                  hi=10_000_000),
        FormField("rank_threshold", "Class-ranker threshold", "float", value=0.15, lo=0.0,
                  hi=1.0, help="minimum ranker score of a selected class"),
        FormField("executor", "Executor", "choice", value="local", choices=EXECUTORS),
        FormField("slurm_template", "SLURM template", "path", required=False,
                  help="sbatch template with XXXcommandXXX, XXXqueueXXX, …"),
        FormField("project_dir", "Project directory", "path",
                  help="new project folder (created by Start)"),
    ]


#: RELION-it boxes (SPEC-schemes "relion_it-style settings")
DOWNSCALED_BOXES = (48, 64, 96, 128, 160, 192, 256, 288, 300, 320, 360, 384, 400, 420, 450, 480,
                    512, 640, 768, 896, 1024)


@dataclass(frozen=True)
class BoxSizes:
    box_px: int
    downscaled_px: int
    mask_diameter_a: float
    pixel_size_a: float  # pixel size of the micrographs (after super-resolution binning)


def box_sizes(diameter_a: float, movie_pixel_a: float, super_resolution: bool) -> BoxSizes:
    """Extraction box, down-scaled box and mask as RELION's relion_it does it.

    Box = diameter in (micrograph) pixels × 1.5, rounded up to even; the down-scaled box is
    the smallest listed size whose pixel size is below 3.75 Å (no down-scaling when the box
    is already that small); mask = 1.1 × diameter.
    """
    from compute.errors import ComputeError
    from compute.extract import box_sizes as rule

    px = movie_pixel_a * (2.0 if super_resolution else 1.0)
    try:
        b = rule(diameter_a, px)
    except ComputeError as exc:
        raise ValueError("particle diameter and pixel size must be positive") from exc
    return BoxSizes(b.box_px, b.small_box_px, round(1.1 * diameter_a, 1), px)


class SetupForm:
    """All fields of the setup window; knows what is missing and what Start needs."""

    def __init__(self) -> None:
        self.fields: dict[str, FormField] = {}
        for key, label, kind, unit, lo, hi, req, hlp in ACQUISITION_FIELDS:
            self.fields[key] = FormField(key, label, kind, unit, lo=lo, hi=hi, required=req,
                                         help=hlp)
        for f in operator_fields():
            f.is_default = f.value is not None
            self.fields[f.key] = f
        self.session_path: Path | None = None
        self.session_kind: str | None = None  # "EPU" | "SerialEM"
        self.warnings: list[str] = []
        #: whether the Topaz picker is installed (None: not known yet)
        self.topaz_available: bool | None = None

    def __getitem__(self, key: str) -> FormField:
        return self.fields[key]

    def value(self, key: str) -> Any:
        return self.fields[key].value

    def apply_record(self, values: dict[str, tuple[Any, str | None, str | None]],
                     session_path: Path | None, kind: str | None,
                     warnings: list[str] | None = None) -> None:
        """Fill acquisition fields from ``{key: (value, source, derived)}`` (adapter output).

        Fields the record does not hold are cleared, so a second session never inherits
        values from the first.
        """
        for key, _label, *_ in ACQUISITION_FIELDS:
            f = self.fields[key]
            v, src, der = values.get(key, (None, None, None))
            f.value, f.source, f.derived, f.confirmed, f.error = v, src, der, False, None
        self.session_path = session_path
        self.session_kind = kind
        self.warnings = list(warnings or [])

    def boxes(self) -> BoxSizes | None:
        d, px = self.value("particle_diameter_a"), self.value("pixel_size_a")
        try:
            return box_sizes(float(d), float(px), bool(self.value("super_resolution")))
        except (TypeError, ValueError):
            return None

    def problems(self) -> list[str]:
        """Everything that blocks Start, one sentence each (empty: ready)."""
        out = []
        for f in self.fields.values():
            if f.key == "slurm_template" and self.value("executor") != "slurm":
                continue
            if f.error:
                out.append(f.error)
            elif f.state == MISSING:
                out.append(f"{f.label} is missing: enter it"
                           + (f" ({f.unit})" if f.unit else ""))
            elif f.state == IMPLAUSIBLE:
                out.append(f"{f.label} = {f.text()} {f.unit} is outside the plausible range "
                           f"{_fmt(f.lo)}–{_fmt(f.hi)}: correct or confirm it")
        sym = self.value("symmetry")
        if sym and not SYMMETRY_RE.match(str(sym)):
            out.append(f"Symmetry {sym!r} is not a point group (C1, C2, D7, T, O, I)")
        if self.value("picker") == "Topaz" and self.topaz_available is False:
            out.append("Topaz is not installed here (pip install 'scopeside[topaz]'): "
                       "choose LoG")
        if self.value("executor") == "slurm" and not self.value("slurm_template"):
            out.append("SLURM template is missing: choose the sbatch template file")
        return out

    def settings_dict(self) -> dict[str, Any]:
        """Confirmed values keyed by field name (input to the adapter's project creation)."""
        return {k: f.value for k, f in self.fields.items()}


# ------------------------------------------------------------------------------------------
# 2D class gallery
# ------------------------------------------------------------------------------------------

SORT_KEYS = ("score", "size", "resolution")


@dataclass
class GalleryData:
    """Class averages of one Class2D iteration with their ranker scores (NumPy only).

    ``images`` are already scaled to uint8 (done in the worker) so the GUI thread only wraps
    them. Unknown values are NaN.
    """

    class2d_job: str
    iteration: int
    class_numbers: np.ndarray  # (N,) int, 1-based as RELION
    images: np.ndarray  # (N, h, w) uint8
    scores: np.ndarray  # (N,) float, NaN when no ranker output yet
    distribution: np.ndarray  # (N,) fraction of particles
    n_particles: np.ndarray  # (N,) int (distribution × total), -1 unknown
    resolution_a: np.ndarray  # (N,) float
    select_job: str | None = None
    reference_images: list[str] = field(default_factory=list)
    #: the operator's earlier choices for this job (from ranker_feedback.star): class -> bool
    stored_overrides: dict[int, bool] = field(default_factory=dict)
    #: the select job's rank_threshold (None: unknown)
    threshold: float | None = None

    def __len__(self) -> int:
        return int(self.class_numbers.shape[0])


class GalleryModel:
    """Sort order, threshold selection and the operator's include/exclude overrides."""

    def __init__(self, threshold: float = 0.15, sort_key: str = "score") -> None:
        self.data: GalleryData | None = None
        self.threshold = float(threshold)
        self.sort_key = sort_key
        #: class number -> True (operator included) / False (operator excluded)
        self.overrides: dict[int, bool] = {}

    def set_data(self, data: GalleryData) -> None:
        """New classes; a different Class2D job starts from the choices stored for it."""
        if self.data is None or data.class2d_job != self.data.class2d_job:
            self.overrides = dict(data.stored_overrides)
        self.data = data

    def order(self) -> np.ndarray:
        """Row indices in display order (best first; NaN last)."""
        d = self.data
        if d is None or len(d) == 0:
            return np.zeros(0, dtype=int)
        if self.sort_key == "score":
            key = -np.nan_to_num(d.scores, nan=-np.inf)
        elif self.sort_key == "size":
            key = -d.distribution
        elif self.sort_key == "resolution":
            key = np.nan_to_num(d.resolution_a, nan=np.inf)
        else:
            raise ValueError(f"unknown sort key {self.sort_key!r}")
        return np.lexsort((d.class_numbers, key))

    def auto_selected(self) -> np.ndarray:
        d = self.data
        if d is None:
            return np.zeros(0, dtype=bool)
        return np.nan_to_num(d.scores, nan=-np.inf) >= self.threshold

    def selected(self) -> np.ndarray:
        """Boolean per row: threshold selection with the operator's overrides applied."""
        sel = self.auto_selected().copy()
        if self.data is not None:
            for i, c in enumerate(self.data.class_numbers):
                if int(c) in self.overrides:
                    sel[i] = self.overrides[int(c)]
        return sel

    def toggle(self, class_number: int) -> bool:
        """Flip one class relative to what is shown now; returns its new state."""
        d = self.data
        if d is None:
            raise ValueError("no classes loaded")
        rows = np.flatnonzero(d.class_numbers == class_number)
        if rows.size == 0:
            raise ValueError(f"no class {class_number}")
        new = not bool(self.selected()[rows[0]])
        auto = bool(self.auto_selected()[rows[0]])
        if new == auto:
            self.overrides.pop(int(class_number), None)
        else:
            self.overrides[int(class_number)] = new
        return new

    def summary(self) -> tuple[int, int, int]:
        """(selected classes, total classes, selected particles or -1 when unknown)."""
        d = self.data
        if d is None:
            return 0, 0, -1
        sel = self.selected()
        n = d.n_particles
        parts = int(n[sel].sum()) if (n >= 0).all() else -1
        return int(sel.sum()), len(d), parts


# ------------------------------------------------------------------------------------------
# Project snapshot (what the monitor shows; produced by readers.scan_project)
# ------------------------------------------------------------------------------------------

@dataclass
class JobState:
    name: str  # original name in the scheme (e.g. "class2d")
    job_dir: str  # current directory, e.g. "Class2D/job007/" (or the scheme folder if new)
    mode: str  # new | continue
    has_started: bool
    status: str  # pending | running | success | failure | aborted
    log_tail: str = ""
    type_label: str = ""


@dataclass
class SchemeState:
    name: str
    current_node: str
    running: bool
    floats: dict[str, float] = field(default_factory=dict)
    bools: dict[str, bool] = field(default_factory=dict)
    strings: dict[str, str] = field(default_factory=dict)
    jobs: list[JobState] = field(default_factory=list)
    error: str | None = None
    #: the scheme's nodes in the order its edges visit them from the start (forks: both)
    nodes: list[str] = field(default_factory=list)

    @property
    def variables(self) -> list[tuple[str, str, Any]]:
        out: list[tuple[str, str, Any]] = [(k, "float", v) for k, v in self.floats.items()]
        out += [(k, "bool", v) for k, v in self.bools.items()]
        out += [(k, "string", v) for k, v in self.strings.items()]
        return out


@dataclass
class ProjectSnapshot:
    project_dir: Path
    schemes: list[SchemeState]
    #: job dir -> (exit status or None, newest mtime of its outputs) used to decide reloads
    job_stamps: dict[str, tuple[str | None, float]] = field(default_factory=dict)

    def scheme(self, name: str) -> SchemeState | None:
        return next((s for s in self.schemes if s.name == name), None)

    @property
    def any_running(self) -> bool:
        return any(s.running for s in self.schemes)


@dataclass
class MicrographTable:
    """Per-micrograph values for the live plots (NumPy arrays, NaN when unknown)."""

    names: list[str]
    time_min: np.ndarray  # acquisition time in minutes since the first (or index)
    time_is_index: bool
    defocus_um: np.ndarray
    ctf_max_res_a: np.ndarray
    total_motion_a: np.ndarray
    n_picked: np.ndarray
    #: name -> (bin edges, counts), computed on the worker
    hists: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def compute_histograms(self, bins: int = 30) -> None:
        for key in ("defocus_um", "ctf_max_res_a", "total_motion_a", "n_picked"):
            v = getattr(self, key)
            v = v[np.isfinite(v)]
            if v.size:
                counts, edges = np.histogram(v, bins=bins)
                self.hists[key] = (edges, counts.astype(float))


@dataclass
class MicrographView:
    name: str
    image: np.ndarray  # (h, w) float32, binned for display
    bin_factor: float
    picks_xy: np.ndarray  # (n, 2) in display pixels
    spectrum: np.ndarray  # (s, s) log power spectrum, centred, left half CTF² model
    pick_diameter_px: float = 0.0  # in display pixels (0: unknown)
    levels: tuple[float, float] = (0.0, 1.0)  # display range (1st/99th percentile)


@dataclass
class Map3D:
    job: str
    name: str
    slices: tuple[np.ndarray, np.ndarray, np.ndarray]  # central z, y, x slices
    fsc_resolution_a: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fsc: np.ndarray = field(default_factory=lambda: np.zeros(0))
    resolution_a: float | None = None
