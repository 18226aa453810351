"""Small builders for test schemes."""

from __future__ import annotations

import json
from pathlib import Path

from app.schemes.jobstar import JobStar
from app.schemes.model import Edge, Operator, Scheme, SchemeJob, Var
from app.schemes.templates import write_scheme


def make_scheme(project: Path, name: str, *, floats=None, bools=None, strings=None,
                operators=None, jobs=None, edges=None, validate: bool = True) -> Scheme:
    """jobs: {name: (mode, label, {options})}; edges: (a, b) or (a, b, true_node, bool)."""
    s = Scheme(name, scheme_dir_name=f"Schemes/{name}/")
    s.floats = {k: Var(float(v), float(v)) for k, v in (floats or {}).items()}
    s.bools = {k: Var(bool(v), bool(v)) for k, v in (bools or {}).items()}
    s.strings = {k: Var(v, v) for k, v in (strings or {}).items()}
    s.operators = {k: Operator(*v) for k, v in (operators or {}).items()}
    js = {}
    for k, (mode, label, opts) in (jobs or {}).items():
        s.jobs[k] = SchemeJob(k, mode, False)
        js[k] = JobStar(label, False, False, {kk: str(vv) for kk, vv in opts.items()})
    for e in edges or []:
        s.edges.append(Edge(e[0], e[1]) if len(e) == 2 else Edge(e[0], e[1], True, e[2], e[3]))
    s.current_node = s.edges[0].input if s.edges else "undefined"
    write_scheme(Path(project) / "Schemes" / name, s, js)
    return Scheme.load(project, name, validate=validate)


def control(project: Path, **kw) -> None:
    (Path(project) / "doubles.json").write_text(json.dumps(kw))


def double_log(project: Path) -> list[str]:
    f = Path(project) / "double_log.txt"
    return f.read_text().splitlines() if f.exists() else []


def movies(project: Path, n: int, start: int = 0) -> None:
    d = Path(project) / "Movies"
    d.mkdir(exist_ok=True)
    for i in range(start, start + n):
        (d / f"mov{i:03d}.tiff").write_bytes(b"")
