"""The Scheme model: ``Schemes/<name>/scheme.star`` read, validated and written as RELION 4 does.

A scheme holds typed variables (float, bool, string; each with a current and a reset value),
operators (named nodes that compute variables), jobs (named nodes whose ``job.star`` lives in
``Schemes/<name>/<job>/``) and edges (plain or forks on a boolean variable).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import UserError
from app.schemes import starfmt

UNDEF = "undefined"
JOB_MODES = ("new", "continue")

log = logging.getLogger(__name__)

#: operator type -> (output kind, input1 kind, input2 kind); kinds: b/f/s variable, n number
#: (float variable or literal), "-" unused, "?" optional of any kind, "*" any variable.
OPERATOR_SIGNATURES: dict[str, tuple[str, str, str]] = {
    "bool=set": ("b", "b", "-"),
    "bool=and": ("b", "b", "b"),
    "bool=or": ("b", "b", "b"),
    "bool=not": ("b", "b", "-"),
    "bool=gt": ("b", "n", "n"),
    "bool=lt": ("b", "n", "n"),
    "bool=ge": ("b", "n", "n"),
    "bool=le": ("b", "n", "n"),
    "bool=eq": ("b", "n", "n"),
    "bool=file_exists": ("b", "s", "-"),
    "bool=read_star": ("b", "s", "n?"),
    "float=set": ("f", "n", "-"),
    "float=plus": ("f", "n", "n"),
    "float=minus": ("f", "n", "n"),
    "float=mult": ("f", "n", "n"),
    "float=divide": ("f", "n", "n"),
    "float=round": ("f", "n", "-"),
    "float=count_images": ("f", "s", "s?"),
    "float=count_words": ("f", "s", "-"),
    "float=read_star": ("f", "s", "n?"),
    "float=star_table_max": ("f", "s", "-"),
    "float=star_table_min": ("f", "s", "-"),
    "float=star_table_avg": ("f", "s", "-"),
    "float=star_table_sort_idx": ("f", "s", "n"),
    "string=set": ("s", "s", "-"),
    "string=join": ("s", "s", "s"),
    "string=before_first": ("s", "s", "s"),
    "string=after_first": ("s", "s", "s"),
    "string=before_last": ("s", "s", "s"),
    "string=after_last": ("s", "s", "s"),
    "string=glob": ("s", "s", "-"),
    "string=nth_word": ("s", "s", "n"),
    "string=read_star": ("s", "s", "n?"),
    "touch_file": ("-", "s", "-"),
    "copy_file": ("-", "s", "s"),
    "move_file": ("-", "s", "s"),
    "delete_file": ("-", "s", "-"),
    "wait": ("f?", "n", "-"),
    "exit_maxtime": ("-", "n", "-"),
    "exit": ("-", "-", "-"),
    "email": ("-", "*", "*?"),
}

#: operators that may appear in a loop without a job (they let time pass or end the run)
PACING_OPERATORS = {"wait", "exit", "exit_maxtime"}


@dataclass
class Var:
    value: object
    reset: object


@dataclass
class Operator:
    type: str
    output: str = UNDEF
    input1: str = UNDEF
    input2: str = UNDEF


@dataclass
class SchemeJob:
    current_name: str
    mode: str = "continue"  # new | continue (any other text is kept as read; see validate)
    has_started: bool = False

    @property
    def mode_is_known(self) -> bool:
        return self.mode in JOB_MODES


@dataclass
class Edge:
    input: str
    output: str
    is_fork: bool = False
    output_if_true: str = UNDEF
    bool_var: str = UNDEF


def parse_number(text: str) -> float | None:
    """A numeric literal (``5``, ``-1``, ``1e3``) as float, else None."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def float_text(v: float) -> str:
    """A float in shortest form (``5``, ``0.25``) as used in ``$$`` substitution."""
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.10g}"


@dataclass
class Scheme:
    """One scheme; ``name`` is the bare name (``prep``), ``path`` its ``scheme.star``."""

    name: str
    current_node: str = UNDEF
    floats: dict[str, Var] = field(default_factory=dict)
    bools: dict[str, Var] = field(default_factory=dict)
    strings: dict[str, Var] = field(default_factory=dict)
    operators: dict[str, Operator] = field(default_factory=dict)
    jobs: dict[str, SchemeJob] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    path: Path | None = None
    #: the text of scheme_general's _rlnSchemeName as read (``Schemes/prep/``)
    scheme_dir_name: str = ""
    #: the ``# version`` written before each table: RELION 4's, or a newer one the file had
    star_version: int = starfmt.VERSION
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def load(cls, project: str | Path, name: str, validate: bool = True) -> Scheme:
        """Read ``<project>/Schemes/<name>/scheme.star`` (and check it, by default)."""
        path = Path(project) / "Schemes" / name / "scheme.star"
        if not path.is_file():
            raise UserError(f"scheme {name!r}: {path} not found")
        sch = cls.from_text(path.read_text(encoding="utf-8"), path)
        if validate:
            sch.validate(Path(project))
        return sch

    @classmethod
    def from_text(cls, text: str, path: Path | str = "<text>") -> Scheme:
        path = Path(path)
        blocks = starfmt.parse(text, path)
        gen = blocks.get("scheme_general")
        if gen is None:
            raise UserError(f"{path}: no data_scheme_general table (not a scheme.star)")
        dir_name = gen.pairs.get("rlnSchemeName", "")
        bare = dir_name.rstrip("/").split("/")[-1] if dir_name else path.parent.name
        sch = cls(name=bare, current_node=gen.pairs.get("rlnSchemeCurrentNodeName", UNDEF),
                  path=path, scheme_dir_name=dir_name or f"Schemes/{bare}/")
        # a newer file (RELION 5: 50001) keeps its version line; RELION's schemer reads the
        # tables the same way whatever the number says
        sch.star_version = max([starfmt.VERSION] + [b.version for b in blocks.values()
                                                    if b.version is not None])

        def rows(table: str, labels: list[str]) -> list[tuple[int, list[str]]]:
            b = blocks.get(table)
            if b is None:
                return []
            missing = [lab for lab in labels if lab not in b.labels]
            if missing:
                raise UserError(f"scheme {bare}: table {table} lacks column(s) "
                                f"{', '.join('_' + m for m in missing)} ({path})")
            idx = [b.labels.index(lab) for lab in labels]
            return [(i + 1, [r[j] for j in idx]) for i, r in enumerate(b.rows)]

        def fnum(table: str, row: int, text: str) -> float:
            v = parse_number(text)
            if v is None:
                raise UserError(f"scheme {bare}: table {table} row {row}: {text!r} is not a "
                                f"number ({path})")
            return v

        def fbool(table: str, row: int, text: str) -> bool:
            t = text.strip().lower()
            if t in ("1", "true", "yes"):
                return True
            if t in ("0", "false", "no"):
                return False
            raise UserError(f"scheme {bare}: table {table} row {row}: {text!r} is not a "
                            f"boolean (0/1) ({path})")

        for i, (n, v, r) in rows("scheme_floats", ["rlnSchemeFloatVariableName",
                                                  "rlnSchemeFloatVariableValue",
                                                  "rlnSchemeFloatVariableResetValue"]):
            sch.floats[n] = Var(fnum("scheme_floats", i, v), fnum("scheme_floats", i, r))
        for i, (n, v, r) in rows("scheme_bools", ["rlnSchemeBooleanVariableName",
                                                 "rlnSchemeBooleanVariableValue",
                                                 "rlnSchemeBooleanVariableResetValue"]):
            sch.bools[n] = Var(fbool("scheme_bools", i, v), fbool("scheme_bools", i, r))
        for _i, (n, v, r) in rows("scheme_strings", ["rlnSchemeStringVariableName",
                                                    "rlnSchemeStringVariableValue",
                                                    "rlnSchemeStringVariableResetValue"]):
            sch.strings[n] = Var(v, r)
        for _i, (n, t, o, a, b) in rows("scheme_operators", [
                "rlnSchemeOperatorName", "rlnSchemeOperatorType", "rlnSchemeOperatorOutput",
                "rlnSchemeOperatorInput1", "rlnSchemeOperatorInput2"]):
            sch.operators[n] = Operator(t, o, a, b)
        for i, (o, c, m, s) in rows("scheme_jobs", ["rlnSchemeJobNameOriginal",
                                                   "rlnSchemeJobName", "rlnSchemeJobMode",
                                                   "rlnSchemeJobHasStarted"]):
            sch.jobs[o] = SchemeJob(c, m, fbool("scheme_jobs", i, s))
        for i, (a, b, f, t, v) in rows("scheme_edges", [
                "rlnSchemeEdgeInputNodeName", "rlnSchemeEdgeOutputNodeName",
                "rlnSchemeEdgeIsFork", "rlnSchemeEdgeOutputNodeNameIfTrue",
                "rlnSchemeEdgeBooleanVariable"]):
            sch.edges.append(Edge(a, b, fbool("scheme_edges", i, f), t, v))
        if sch.current_node == UNDEF and sch.edges:
            sch.current_node = sch.edges[0].input
        return sch

    # -- writing ----------------------------------------------------------------------------
    def _loop(self, name: str, labels: list[str], rows: list[tuple]) -> str:
        """A loop table's text, reused while its rows are unchanged (the schemer saves after
        every step, and usually only the current node changed)."""
        key = repr((self.star_version, rows))  # repr, not ==: keeps -0.0/0.0, True/1.0 apart
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        text = starfmt.format_loop(name, labels, [list(r) for r in rows], self.star_version)
        self._cache[name] = (key, text)
        return text

    def to_text(self) -> str:
        """scheme.star text in RELION 4's layout (tables sorted by name, as RELION's maps are)."""
        parts = [starfmt.format_list("scheme_general", [
            ("rlnSchemeName", self.scheme_dir_name or f"Schemes/{self.name}/"),
            ("rlnSchemeCurrentNodeName", self.current_node)], self.star_version)]
        if self.floats:
            parts.append(self._loop(
                "scheme_floats", ["rlnSchemeFloatVariableName", "rlnSchemeFloatVariableValue",
                                  "rlnSchemeFloatVariableResetValue"],
                [(k, float(v.value), float(v.reset)) for k, v in sorted(self.floats.items())]))
        if self.bools:
            parts.append(self._loop(
                "scheme_bools", ["rlnSchemeBooleanVariableName", "rlnSchemeBooleanVariableValue",
                                 "rlnSchemeBooleanVariableResetValue"],
                [(k, bool(v.value), bool(v.reset)) for k, v in sorted(self.bools.items())]))
        if self.strings:
            parts.append(self._loop(
                "scheme_strings", ["rlnSchemeStringVariableName", "rlnSchemeStringVariableValue",
                                   "rlnSchemeStringVariableResetValue"],
                [(k, str(v.value), str(v.reset)) for k, v in sorted(self.strings.items())]))
        if self.operators:
            parts.append(self._loop(
                "scheme_operators", ["rlnSchemeOperatorName", "rlnSchemeOperatorType",
                                     "rlnSchemeOperatorOutput", "rlnSchemeOperatorInput1",
                                     "rlnSchemeOperatorInput2"],
                [(k, o.type, o.output, o.input1, o.input2)
                 for k, o in sorted(self.operators.items())]))
        if self.jobs:
            parts.append(self._loop(
                "scheme_jobs", ["rlnSchemeJobNameOriginal", "rlnSchemeJobName",
                                "rlnSchemeJobMode", "rlnSchemeJobHasStarted"],
                [(k, j.current_name, j.mode, bool(j.has_started))
                 for k, j in sorted(self.jobs.items())]))
        if self.edges:
            parts.append(self._loop(
                "scheme_edges", ["rlnSchemeEdgeInputNodeName", "rlnSchemeEdgeOutputNodeName",
                                 "rlnSchemeEdgeIsFork", "rlnSchemeEdgeOutputNodeNameIfTrue",
                                 "rlnSchemeEdgeBooleanVariable"],
                [(e.input, e.output, bool(e.is_fork), e.output_if_true, e.bool_var)
                 for e in self.edges]))
        return "".join(parts)

    def save(self, path: Path | None = None) -> None:
        """Write atomically (temporary file, then rename)."""
        target = Path(path or self.path or "")
        if not str(target):
            raise UserError(f"scheme {self.name}: no path to save to")
        starfmt.atomic_write(target, self.to_text(), exchange=True)

    # -- queries ----------------------------------------------------------------------------
    def is_job(self, node: str) -> bool:
        return node in self.jobs

    def is_operator(self, node: str) -> bool:
        return node in self.operators

    def variable_kind(self, name: str) -> str | None:
        if name in self.floats:
            return "f"
        if name in self.bools:
            return "b"
        if name in self.strings:
            return "s"
        return None

    def variable_text(self, name: str) -> str:
        """A variable's value as ``$$`` substitution text (Yes/No, shortest float, string)."""
        if name in self.bools:
            return "Yes" if self.bools[name].value else "No"
        if name in self.floats:
            return float_text(float(self.floats[name].value))
        if name in self.strings:
            return str(self.strings[name].value)
        raise UserError(f"scheme {self.name}: unknown variable {name!r}")

    def next_node(self, node: str) -> str:
        """The output of the LAST edge leaving ``node`` (a fork follows its bool), or undefined."""
        result = UNDEF
        for e in self.edges:
            if e.input == node:
                if e.is_fork and self.bools.get(e.bool_var, Var(False, False)).value:
                    result = e.output_if_true
                else:
                    result = e.output
        return result

    def start_node(self) -> str:
        return self.edges[0].input if self.edges else UNDEF

    def reachable_nodes(self) -> set[str]:
        """Nodes the walk can reach from the start node (where a reset puts it) or the current
        node. As in :meth:`next_node`, only the last edge leaving a node counts; both ways of
        a fork are followed."""
        last: dict[str, Edge] = {}
        for e in self.edges:
            last[e.input] = e
        todo = [n for n in (self.start_node(), self.current_node) if n != UNDEF]
        seen: set[str] = set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            e = last.get(n)
            if e is not None:
                todo.append(e.output)
                if e.is_fork:
                    todo.append(e.output_if_true)
        return seen

    def reset(self) -> None:
        """Variables to their reset values, jobs to their original names, not started."""
        for table in (self.floats, self.bools, self.strings):
            for v in table.values():
                v.value = v.reset
        for ori, j in self.jobs.items():
            j.current_name = ori
            j.has_started = False
        self.current_node = self.start_node()

    def set_variable(self, name: str, text: str, also_reset: bool = False) -> None:
        """Set a variable from text, checked against its type."""
        kind = self.variable_kind(name)
        if kind is None:
            known = ", ".join(sorted([*self.floats, *self.bools, *self.strings]))
            raise UserError(f"scheme {self.name}: no variable {name!r} (variables: {known})")
        if kind == "f":
            v = parse_number(text)
            if v is None:
                raise UserError(f"scheme {self.name}: {name} is a float variable; "
                                f"{text!r} is not a number")
            value: object = v
            table = self.floats
        elif kind == "b":
            low = text.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise UserError(f"scheme {self.name}: {name} is a boolean variable; "
                                f"{text!r} is not true/false")
            value = low in ("1", "true", "yes")
            table = self.bools
        else:
            value = text
            table = self.strings
        table[name].value = value
        if also_reset:
            table[name].reset = value

    # -- validation -------------------------------------------------------------------------
    def validate(self, project: Path | None = None) -> None:
        """Raise :class:`UserError` naming scheme, table and row for the first problem found."""
        where = f"scheme {self.name}"
        nodes = set(self.operators) | set(self.jobs)
        dup = set(self.operators) & set(self.jobs)
        if dup:
            raise UserError(f"{where}: {sorted(dup)[0]!r} is both an operator and a job")
        seen: dict[str, str] = {}
        for table, names in (("scheme_floats", self.floats), ("scheme_bools", self.bools),
                             ("scheme_strings", self.strings)):
            for n in names:
                if n in seen:
                    raise UserError(f"{where}: variable {n!r} is in both {seen[n]} and {table}")
                seen[n] = table
        for i, (name, op) in enumerate(sorted(self.operators.items()), 1):
            self._check_operator(name, op, f"{where}, table scheme_operators row {i} ({name})")
        for i, (name, _j) in enumerate(sorted(self.jobs.items()), 1):
            loc = f"{where}, table scheme_jobs row {i} ({name})"
            if project is not None:
                js = Path(project) / "Schemes" / self.name / name / "job.star"
                if not js.is_file():
                    raise UserError(f"{loc}: {js} is missing")
        for i, e in enumerate(self.edges, 1):
            loc = f"{where}, table scheme_edges row {i} ({e.input} -> {e.output})"
            for n in (e.input, e.output) + ((e.output_if_true,) if e.is_fork else ()):
                if n not in nodes:
                    raise UserError(f"{loc}: unknown node {n!r}")
            if e.is_fork and e.bool_var not in self.bools:
                raise UserError(f"{loc}: fork variable {e.bool_var!r} is not a boolean variable")
        if self.current_node != UNDEF and self.current_node not in nodes:
            raise UserError(f"{where}, table scheme_general: current node "
                            f"{self.current_node!r} is not an operator or job")
        reachable = self.reachable_nodes()
        self._check_job_modes(where, reachable)
        if project is not None:
            self._check_job_types(Path(project), where, reachable)
        self._check_idle_cycles(where)

    def _check_job_modes(self, where: str, reachable: set[str]) -> None:
        """RELION (``Scheme::run``) accepts any mode text on reading; on reaching the job it
        makes a new job when the job has not started or the mode is ``new``, continues it for
        ``continue``, and otherwise stops with "unrecognised mode". So a job with another
        mode that the walk can reach is refused here, before anything runs; one it cannot
        reach (RELION 5's amyprep has ``importmovies`` with mode ``""``) is only reported."""
        for i, (name, j) in enumerate(sorted(self.jobs.items()), 1):
            if j.mode_is_known:
                continue
            loc = f"{where}, table scheme_jobs row {i} ({name})"
            if name in reachable:
                raise UserError(f"{loc}: mode {j.mode!r} is neither 'new' nor 'continue', and "
                                "the scheme reaches this job (RELION runs it as a new job the "
                                "first time and stops with 'unrecognised mode' the next time); "
                                "set its mode to new or continue")
            log.warning("%s: mode %r is neither 'new' nor 'continue'; no edge reaches this "
                        "job, so it never runs", loc, j.mode)

    def _check_job_types(self, project: Path, where: str, reachable: set[str]) -> None:
        """Every job's ``_rlnJobTypeLabel`` must be a type scopeside implements (the job
        registry decides): refused for a job the walk can reach (it would fail only when
        reached, possibly hours into a session), reported for one it cannot reach."""
        import importlib.util

        from app.jobs import JOB_TYPES, find_type
        from app.schemes.jobstar import read_job_star

        bad: list[tuple[str, str, str]] = []
        for name in sorted(self.jobs):
            js = project / "Schemes" / self.name / name / "job.star"
            if not js.is_file():
                continue
            label = read_job_star(js).type_label
            try:
                jt = find_type(label)
            except UserError as exc:
                why = str(exc)
                if why.startswith("unknown job type"):
                    why = ""  # the message lists the implemented types once
                bad.append((name, label, why.removeprefix(f"job type {label}: ")))
                continue
            try:
                found = importlib.util.find_spec(jt.module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                bad.append((name, label, "not implemented yet"))

        def listing(items: list[tuple[str, str, str]]) -> str:
            return ", ".join(f"{n} ({lab or 'no _rlnJobTypeLabel'}"
                             + (f": {why}" if why else "") + ")" for n, lab, why in items)

        unreached = [b for b in bad if b[0] not in reachable]
        if unreached:
            log.warning("%s: job type not implemented by scopeside for %s; no edge reaches "
                        "these jobs, so they never run", where, listing(unreached))
        reached = [b for b in bad if b[0] in reachable]
        if reached:
            raise UserError(f"{where}: the scheme reaches {len(reached)} job(s) whose type "
                            f"scopeside does not implement: {listing(reached)}. Implemented "
                            f"types: {', '.join(t.label for t in JOB_TYPES.values())}. The run "
                            "would stop at the first of them; do those jobs in RELION or take "
                            "them out of the scheme")

    def _check_operator(self, name: str, op: Operator, loc: str) -> None:
        sig = OPERATOR_SIGNATURES.get(op.type)
        if sig is None:
            raise UserError(f"{loc}: unknown operator type {op.type!r}")
        for slot, kind, val in (("output", sig[0], op.output), ("input1", sig[1], op.input1),
                                ("input2", sig[2], op.input2)):
            optional = kind.endswith("?")
            k = kind.rstrip("?")
            if k == "-" or (optional and val in (UNDEF, "")):
                continue
            have = self.variable_kind(val)
            if k == "*":
                if have is None:
                    raise UserError(f"{loc}: {slot} {val!r} is not a variable")
                continue
            if k == "n":
                if have == "f" or (have is None and parse_number(val) is not None):
                    continue
                raise UserError(f"{loc}: {slot} {val!r} must be a float variable or a number")
            if have != k:
                kinds = {"f": "float", "b": "boolean", "s": "string"}
                raise UserError(f"{loc}: {slot} {val!r} must be a {kinds[k]} variable"
                                + (f" (it is a {kinds[have]} variable)" if have else
                                   " (no such variable)"))

    def _check_idle_cycles(self, where: str) -> None:
        """A loop made only of operators, none of which waits or exits, would spin forever."""
        idle = {n for n, op in self.operators.items() if op.type not in PACING_OPERATORS}
        succ: dict[str, set[str]] = {n: set() for n in idle}
        for e in self.edges:
            if e.input in idle:
                for out in (e.output, e.output_if_true) if e.is_fork else (e.output,):
                    if out in idle:
                        succ[e.input].add(out)
        # iterative DFS cycle detection on the idle subgraph
        state: dict[str, int] = {}
        for start in sorted(idle):
            if state.get(start):
                continue
            stack = [(start, iter(sorted(succ[start])))]
            state[start] = 1
            path = [start]
            while stack:
                node, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    state[node] = 2
                    stack.pop()
                    path.pop()
                    continue
                if state.get(nxt) == 1:
                    cyc = path[path.index(nxt):] + [nxt]
                    raise UserError(f"{where}, table scheme_edges: the operators "
                                    f"{' -> '.join(cyc)} form a loop with no job and no wait; "
                                    "it would never pause")
                if not state.get(nxt):
                    state[nxt] = 1
                    path.append(nxt)
                    stack.append((nxt, iter(sorted(succ[nxt]))))
