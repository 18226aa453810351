"""``default_pipeline.star`` kept as RELION 4 keeps it: processes, nodes and the edges between them.

Tables (RELION 4 layout, ``# version 30001``): ``pipeline_general`` (job counter),
``pipeline_processes`` (name, alias, type label, status), ``pipeline_nodes`` (name, type
label, depth), ``pipeline_input_edges`` (node -> process) and ``pipeline_output_edges``
(process -> node). Every change happens under RELION's lock directory
``.relion_lock/lock_default_pipeline`` and is written atomically, so the prep and proc
schemers (and RELION's GUI) can share one project.

A RELION 3.1 pipeline (integer ``_rlnPipeLineProcessType`` / ``_rlnPipeLineProcessStatus``
/ ``_rlnPipeLineNodeType`` columns) is converted on reading, as RELION 4's
``PipeLine::read`` does, with one warning; the next write is in RELION 4's label format.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import UserError
from app.schemes import starfmt

PIPELINE = "default_pipeline.star"
LOCK_DIR = ".relion_lock"
LOCK_FILE = "lock_default_pipeline"
STATUS = {"running": "Running", "scheduled": "Scheduled", "success": "Succeeded",
          "failure": "Failed", "aborted": "Aborted"}

log = logging.getLogger(__name__)

# RELION 3.1 wrote integers where RELION 4 writes labels. The numbers are RELION 3.1's
# ``PROC_*`` / ``PROC_RUNNING...`` / ``NODE_*`` constants (src/pipeline_jobs.h, 3.1.4);
# the process labels are RELION 4's ``proc_type2labelnew`` (src/pipeline_jobs.h, 4.0.2),
# which ``PipeLine::read`` uses through ``get_proc_label`` for such files.
RELION31_PROCESS_TYPES = {
    0: "relion.import", 1: "relion.motioncorr", 2: "relion.ctffind", 3: "relion.manualpick",
    4: "relion.autopick", 5: "relion.extract", 7: "relion.select", 8: "relion.class2d",
    9: "relion.class3d", 10: "relion.refine3d", 12: "relion.maskcreate", 13: "relion.joinstar",
    14: "relion.subtract", 15: "relion.postprocess", 16: "relion.localres",
    18: "relion.initialmodel", 19: "relion.multibody", 20: "relion.polish",
    21: "relion.ctfrefine", 50: "relion.importtomo", 51: "relion.pseudosubtomo",
    52: "relion.ctfrefinetomo", 53: "relion.framealigntomo",
    54: "relion.reconstructparticletomo", 99: "relion.external",
}
RELION31_STATUS = {0: "Running", 1: "Scheduled", 2: "Succeeded", 3: "Failed", 4: "Aborted"}
# RELION 3.1 ``NODE_*`` meaning -> the RELION 4 (CCP-EM pipeliner) label for it. RELION 4.0
# itself looks these integers up in its *new* numbering (``get_node_label``: 1 = movies,
# 2 = micrographs, ...), which shifts every 3.1 node by one kind; we go by what 3.1 meant.
RELION31_NODE_TYPES = {
    0: "MicrographMoviesData.star.relion",      # NODE_MOVIES
    1: "MicrographsData.star.relion",           # NODE_MICS
    2: "MicrographsCoords.star.relion",         # NODE_MIC_COORDS
    3: "ParticlesData.star.relion",             # NODE_PART_DATA
    5: "ImagesData.star.relion",                # NODE_2DREFS
    6: "DensityMap.mrc",                        # NODE_3DREF
    7: "Mask3D.mrc",                            # NODE_MASK
    8: "ProcessData.star.relion",               # NODE_MODEL (no RELION 4 counterpart)
    9: "ProcessData.star.relion.optimiser",     # NODE_OPTIMISER
    10: "DensityMap.mrc.halfmap",               # NODE_HALFMAP
    11: "DensityMap.mrc",                       # NODE_FINALMAP
    12: "Image3D.mrc.localresmap",              # NODE_RESMAP
    13: "LogFile.pdf.relion",                   # NODE_PDF_LOGFILE
    14: "ProcessData.star.relion.postprocess",  # NODE_POST
    15: "ProcessData.txt.relion.polish.params", # NODE_POLISH_PARAMS
}
# RELION's output folders, for a 3.1 process whose type number is unknown (RELION 4 also
# accepts these folder names as process labels, for files of its alpha versions)
_PROCESS_DIRS = {"Import": 0, "MotionCorr": 1, "CtfFind": 2, "ManualPick": 3, "AutoPick": 4,
                 "Extract": 5, "Select": 7, "Class2D": 8, "Class3D": 9, "Refine3D": 10,
                 "MaskCreate": 12, "JoinStar": 13, "Subtract": 14, "PostProcess": 15,
                 "LocalRes": 16, "InitialModel": 18, "MultiBody": 19, "Polish": 20,
                 "CtfRefine": 21, "External": 99}


def _int(text: str) -> int | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return int(v) if v.is_integer() else None


@dataclass
class Process:
    name: str
    alias: str = "None"
    type_label: str = ""
    status: str = "Running"


@dataclass
class Pipeline:
    job_counter: int = 1
    processes: list[Process] = field(default_factory=list)
    nodes: list[tuple[str, str, int]] = field(default_factory=list)
    input_edges: list[tuple[str, str]] = field(default_factory=list)
    output_edges: list[tuple[str, str]] = field(default_factory=list)
    #: "3.1" when read from a RELION 3.1 file (integer types) and converted; "" otherwise
    converted_from: str = ""

    @classmethod
    def from_text(cls, text: str, path: Path | str = PIPELINE) -> Pipeline:
        blocks = starfmt.parse(text, path)
        p = cls()
        gen = blocks.get("pipeline_general")
        if gen is not None:
            p.job_counter = int(float(gen.pairs.get("rlnPipeLineJobCounter", "1")))
        unknown: list[str] = []
        converted = False
        procs = blocks.get("pipeline_processes")
        if procs is not None and procs.rows:
            have = set(procs.labels)
            new = {"rlnPipeLineProcessTypeLabel", "rlnPipeLineProcessStatusLabel"} <= have
            old = {"rlnPipeLineProcessType", "rlnPipeLineProcessStatus"} <= have
            if not (new or old):
                raise UserError(f"{path}: table pipeline_processes has neither "
                                "_rlnPipeLineProcessTypeLabel/_rlnPipeLineProcessStatusLabel "
                                "(RELION 4) nor _rlnPipeLineProcessType/_rlnPipeLineProcessStatus "
                                "(RELION 3.1)")
            converted |= not new
            for rec in procs.records():
                name = rec.get("rlnPipeLineProcessName", "")
                alias = rec.get("rlnPipeLineProcessAlias", "None")
                if new:
                    p.processes.append(Process(name, alias, rec["rlnPipeLineProcessTypeLabel"],
                                               rec["rlnPipeLineProcessStatusLabel"]))
                    continue
                p.processes.append(Process(name, alias,
                                           _process_label(name, rec["rlnPipeLineProcessType"],
                                                          unknown),
                                           _status_label(name, rec["rlnPipeLineProcessStatus"],
                                                         unknown)))
        nodes = blocks.get("pipeline_nodes")
        if nodes is not None and nodes.rows:
            new = "rlnPipeLineNodeTypeLabel" in nodes.labels
            old = "rlnPipeLineNodeType" in nodes.labels
            if not (new or old):
                raise UserError(f"{path}: table pipeline_nodes has neither "
                                "_rlnPipeLineNodeTypeLabel (RELION 4) nor _rlnPipeLineNodeType "
                                "(RELION 3.1)")
            converted |= not new
            for rec in nodes.records():
                name = rec.get("rlnPipeLineNodeName", "")
                label = (rec["rlnPipeLineNodeTypeLabel"] if new else
                         _node_label(name, rec["rlnPipeLineNodeType"], unknown))
                p.nodes.append((name, label,
                                int(float(rec.get("rlnPipeLineNodeTypeLabelDepth", "1")))))
        if "pipeline_input_edges" in blocks:
            for rec in blocks["pipeline_input_edges"].records():
                p.input_edges.append((rec["rlnPipeLineEdgeFromNode"], rec["rlnPipeLineEdgeProcess"]))
        if "pipeline_output_edges" in blocks:
            for rec in blocks["pipeline_output_edges"].records():
                p.output_edges.append((rec["rlnPipeLineEdgeProcess"], rec["rlnPipeLineEdgeToNode"]))
        if converted:
            p.converted_from = "3.1"
            log.warning("%s is a RELION 3.1 pipeline (integer process/node types): converted "
                        "to RELION 4 labels as RELION 4 does; the next change writes it in "
                        "RELION 4's format", path)
        if unknown:
            log.warning("%s: RELION 3.1 numbers this program does not know: %s", path,
                        "; ".join(unknown))
        return p

    def to_text(self) -> str:
        parts = [starfmt.format_list("pipeline_general", [("rlnPipeLineJobCounter",
                                                           int(self.job_counter))])]
        if self.processes:
            parts.append(starfmt.format_loop(
                "pipeline_processes", ["rlnPipeLineProcessName", "rlnPipeLineProcessAlias",
                                       "rlnPipeLineProcessTypeLabel",
                                       "rlnPipeLineProcessStatusLabel"],
                [[p.name, p.alias, p.type_label, p.status] for p in self.processes]))
        if self.nodes:
            parts.append(starfmt.format_loop(
                "pipeline_nodes", ["rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel",
                                   "rlnPipeLineNodeTypeLabelDepth"],
                [[n, t, int(d)] for n, t, d in self.nodes]))
        if self.input_edges:
            parts.append(starfmt.format_loop(
                "pipeline_input_edges", ["rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess"],
                [list(e) for e in self.input_edges]))
        if self.output_edges:
            parts.append(starfmt.format_loop(
                "pipeline_output_edges", ["rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode"],
                [list(e) for e in self.output_edges]))
        return "".join(parts)

    def find(self, name: str) -> Process | None:
        for p in self.processes:
            if p.name == name:
                return p
        return None


def _process_label(name: str, text: str, unknown: list[str]) -> str:
    """A RELION 3.1 process type number as RELION 4's label."""
    n = _int(text)
    if n in RELION31_PROCESS_TYPES:
        return RELION31_PROCESS_TYPES[n]
    folder = name.split("/", 1)[0]
    if folder in _PROCESS_DIRS:
        label = RELION31_PROCESS_TYPES[_PROCESS_DIRS[folder]]
        unknown.append(f"process {name} type {text} (labelled {label} from its folder)")
        return label
    unknown.append(f"process {name} type {text} (kept as {text!r})")
    return text


def _status_label(name: str, text: str, unknown: list[str]) -> str:
    n = _int(text)
    if n in RELION31_STATUS:
        return RELION31_STATUS[n]
    # RELION 4 cannot write a status outside its five labels: record it as failed
    unknown.append(f"process {name} status {text} (recorded as Failed)")
    return STATUS["failure"]


def _node_label(name: str, text: str, unknown: list[str]) -> str:
    n = _int(text)
    if n in RELION31_NODE_TYPES:
        return RELION31_NODE_TYPES[n]
    unknown.append(f"node {name} type {text} (kept as {text!r})")
    return text


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    except OSError:
        return True


@contextmanager
def _locked(project: Path, timeout_s: float = 120.0):
    lock_dir = project / LOCK_DIR
    me = f"lock mechanism from scopeside\npid={os.getpid()} host={socket.gethostname()}\n"
    t0 = time.monotonic()
    while True:
        try:
            lock_dir.mkdir()
            (lock_dir / LOCK_FILE).write_text(me, encoding="utf-8")
            break
        except FileExistsError:
            _clear_stale(lock_dir)
            if time.monotonic() - t0 > timeout_s:
                raise UserError(f"{lock_dir} has existed for {timeout_s:.0f} s: another program "
                                "holds the pipeline lock; remove it if nothing is running") from None
            time.sleep(0.02)
    try:
        yield
    finally:
        try:
            (lock_dir / LOCK_FILE).unlink(missing_ok=True)
            lock_dir.rmdir()
        except OSError:
            pass


def _clear_stale(lock_dir: Path) -> None:
    """Remove a pipeline lock left by a process of ours that died on this host."""
    try:
        text = (lock_dir / LOCK_FILE).read_text(encoding="utf-8")
    except OSError:
        return
    fields = dict(kv.split("=", 1) for kv in text.split() if "=" in kv)
    if fields.get("host") == socket.gethostname() and "pid" in fields:
        if not _pid_alive(int(fields["pid"])):
            try:
                (lock_dir / LOCK_FILE).unlink(missing_ok=True)
                lock_dir.rmdir()
            except OSError:
                pass


def load(project: Path) -> Pipeline:
    path = Path(project) / PIPELINE
    if not path.exists():
        return Pipeline()
    return Pipeline.from_text(path.read_text(encoding="utf-8"), path)


@contextmanager
def edit(project: Path):
    """Lock, read, let the caller change the pipeline, write atomically, unlock."""
    project = Path(project)
    with _locked(project):
        p = load(project)
        yield p
        starfmt.atomic_write(project / PIPELINE, p.to_text())


def new_process(project: Path, process_dir: str, type_label: str) -> str:
    """Reserve ``<process_dir>/jobNNN/`` (the next free number), record it as Running."""
    project = Path(project)
    with edit(project) as p:
        n = max(1, p.job_counter)
        while (project / process_dir / f"job{n:03d}").exists() or \
                any(q.name.endswith(f"/job{n:03d}/") for q in p.processes):
            n += 1
        name = f"{process_dir}/job{n:03d}/"
        (project / name).mkdir(parents=True, exist_ok=True)
        p.processes.append(Process(name, "None", type_label, STATUS["running"]))
        p.job_counter = n + 1
    return name


def set_status(project: Path, process: str, state: str, type_label: str = "") -> None:
    """Set a process's status (``running``/``success``/``failure``/``aborted``)."""
    with edit(project) as p:
        proc = p.find(process)
        if proc is None:
            proc = Process(process, "None", type_label, STATUS[state])
            p.processes.append(proc)
        proc.status = STATUS[state]


def record_nodes(project: Path, process: str) -> None:
    """Add the nodes and edges a job listed in its ``job_nodes.json``."""
    project = Path(project)
    f = project / process / "job_nodes.json"
    if not f.exists():
        return
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    with edit(project) as p:
        names = {n for n, _, _ in p.nodes}

        def add_node(name: str, typ: str) -> None:
            if name not in names:
                p.nodes.append((name, typ, 1))
                names.add(name)

        for node in data.get("inputs", []):
            add_node(node["name"], node["type"])
            if (node["name"], process) not in p.input_edges:
                p.input_edges.append((node["name"], process))
        for node in data.get("outputs", []):
            add_node(node["name"], node["type"])
            if (process, node["name"]) not in p.output_edges:
                p.output_edges.append((process, node["name"]))
