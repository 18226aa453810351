"""``default_pipeline.star`` kept as RELION 4 keeps it: processes, nodes and the edges between them.

Tables (RELION 4 layout, ``# version 30001``): ``pipeline_general`` (job counter),
``pipeline_processes`` (name, alias, type label, status), ``pipeline_nodes`` (name, type
label, depth), ``pipeline_input_edges`` (node -> process) and ``pipeline_output_edges``
(process -> node). Every change happens under RELION's lock directory
``.relion_lock/lock_default_pipeline`` and is written atomically, so the prep and proc
schemers (and RELION's GUI) can share one project.
"""

from __future__ import annotations

import json
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

    @classmethod
    def from_text(cls, text: str, path: Path | str = PIPELINE) -> Pipeline:
        blocks = starfmt.parse(text, path)
        p = cls()
        gen = blocks.get("pipeline_general")
        if gen is not None:
            p.job_counter = int(float(gen.pairs.get("rlnPipeLineJobCounter", "1")))
        for rec in blocks["pipeline_processes"].records() if "pipeline_processes" in blocks else []:
            p.processes.append(Process(rec.get("rlnPipeLineProcessName", ""),
                                       rec.get("rlnPipeLineProcessAlias", "None"),
                                       rec.get("rlnPipeLineProcessTypeLabel", ""),
                                       rec.get("rlnPipeLineProcessStatusLabel", "Running")))
        for rec in blocks["pipeline_nodes"].records() if "pipeline_nodes" in blocks else []:
            p.nodes.append((rec.get("rlnPipeLineNodeName", ""),
                            rec.get("rlnPipeLineNodeTypeLabel", ""),
                            int(float(rec.get("rlnPipeLineNodeTypeLabelDepth", "1")))))
        if "pipeline_input_edges" in blocks:
            for rec in blocks["pipeline_input_edges"].records():
                p.input_edges.append((rec["rlnPipeLineEdgeFromNode"], rec["rlnPipeLineEdgeProcess"]))
        if "pipeline_output_edges" in blocks:
            for rec in blocks["pipeline_output_edges"].records():
                p.output_edges.append((rec["rlnPipeLineEdgeProcess"], rec["rlnPipeLineEdgeToNode"]))
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
