"""Scheme operators: each reads and writes scheme variables (RELION 4 semantics).

Differences from RELION 4 (deliberate, documented in docs/schemes.md):

- a numeric literal as an input (``bool=gt x 5``) is its number; RELION evaluates it as 0;
- ``string=nth_word`` with a negative N counts from the end (-1 = last word); RELION's
  arithmetic for negatives is off by the word count;
- rewriting a ``Schemes/<s>/<job>/`` path applies to input2 as well (RELION writes the
  rewritten input2 into input1);
- ``copy_file``/``move_file``/``delete_file`` use Python's file functions, never a shell;
- ``wait`` sleeps in short slices so an abort stops it within a second, not ten.
"""

from __future__ import annotations

import glob as _glob
import logging
import math
import os
import shutil
import smtplib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from app.errors import UserError
from app.schemes.model import UNDEF, Operator, Scheme, float_text, parse_number

log = logging.getLogger(__name__)


class Clock:
    """Wall clock; tests pass a fake one with the same two methods."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


class StopScheme(Exception):
    """Raised by an operator (exit, exit_maxtime) to end the run normally."""


class AbortRequested(Exception):
    """Raised when RELION_JOB_ABORT_NOW appeared while an operator was waiting."""


@dataclass
class OpContext:
    """What operators need besides the scheme: files, time, abort checks, path rewriting."""

    scheme: Scheme
    project: Path
    clock: Clock = field(default_factory=Clock)
    abort_requested: Callable[[], bool] = lambda: False
    rewrite: Callable[[str], str] = lambda s: s
    #: per-run state (RELION keeps these in process globals)
    wait_stamp: float | None = None
    exit_time: float | None = None
    #: how often ``wait`` checks for an abort (s)
    poll_s: float = 0.5

    def path(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else self.project / q


def _num(ctx: OpContext, name: str) -> float:
    s = ctx.scheme
    if name in s.floats:
        return float(s.floats[name].value)
    v = parse_number(name)
    if v is None:
        raise UserError(f"scheme {s.name}: {name!r} is neither a float variable nor a number")
    return v


def _str(ctx: OpContext, name: str) -> str:
    s = ctx.scheme
    if name not in s.strings:
        raise UserError(f"scheme {s.name}: {name!r} is not a string variable")
    return ctx.rewrite(str(s.strings[name].value))


def _bool(ctx: OpContext, name: str) -> bool:
    return bool(ctx.scheme.bools[name].value)


def _star_spec(ctx: OpContext, name: str) -> tuple[Path, str, str]:
    text = _str(ctx, name)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) < 3:
        raise UserError(f"scheme {ctx.scheme.name}: {name} = {text!r}; read_star needs "
                        "'file.star,table,rlnLabel'")
    return ctx.path(parts[0]), parts[1], parts[2].lstrip("_")


def _read_column(ctx: OpContext, name: str):
    from metadata.star import read_table

    path, table, label = _star_spec(ctx, name)
    df = read_table(path, table)
    if label not in df.columns:
        raise UserError(f"{path}: table {table} has no column {label}")
    return df[label]


def _row_index(ctx: OpContext, op: Operator) -> int:
    if op.input2 in (UNDEF, ""):
        return 0
    return int(round(_num(ctx, op.input2)))


def count_rows(path: Path, table: str) -> int:
    """Rows in ``table`` of a STAR file; 0 when the file does not exist (yet)."""
    from metadata.star import read_star

    if not path.exists():
        return 0
    data = read_star(path)
    if table not in data:
        return 0
    df = data[table]
    return 0 if df is None else int(len(df))


def _set(ctx: OpContext, out: str, value: object) -> None:
    s = ctx.scheme
    if out in s.floats:
        s.floats[out].value = float(value)  # type: ignore[arg-type]
    elif out in s.bools:
        s.bools[out].value = bool(value)
    elif out in s.strings:
        s.strings[out].value = str(value)
    else:
        raise UserError(f"scheme {s.name}: operator output {out!r} is not a variable")


def _cmp(f: Callable[[float, float], bool]):
    def run(ctx: OpContext, op: Operator) -> None:
        _set(ctx, op.output, f(_num(ctx, op.input1), _num(ctx, op.input2)))
    return run


def _arith(f: Callable[[float, float], float]):
    def run(ctx: OpContext, op: Operator) -> None:
        _set(ctx, op.output, f(_num(ctx, op.input1), _num(ctx, op.input2)))
    return run


def _divide(a: float, b: float) -> float:
    if b == 0:
        raise UserError("float=divide: division by zero")
    return a / b


def _round_half_away(x: float) -> float:
    return float(math.floor(x + 0.5)) if x >= 0 else float(math.ceil(x - 0.5))


def _split_words(text: str) -> list[str]:
    return [] if text in (UNDEF, "") else text.split(",")


def _read_star_scalar(ctx: OpContext, op: Operator):
    col = _read_column(ctx, op.input1)
    i = _row_index(ctx, op)
    if not 0 <= i < len(col):
        path, table, _ = _star_spec(ctx, op.input1)
        raise UserError(f"{path}: table {table} has {len(col)} rows; row {i} asked for")
    return col.iloc[i]


def _op_bool_read_star(ctx: OpContext, op: Operator) -> None:
    v = _read_star_scalar(ctx, op)
    if isinstance(v, str):
        v = v.strip().lower() in ("1", "true", "yes")
    _set(ctx, op.output, bool(v))


def _op_float_read_star(ctx: OpContext, op: Operator) -> None:
    v = _read_star_scalar(ctx, op)
    _set(ctx, op.output, float(v))


def _op_string_read_star(ctx: OpContext, op: Operator) -> None:
    v = _read_star_scalar(ctx, op)
    _set(ctx, op.output, float_text(v) if isinstance(v, float) else str(v))


def _stat(kind: str):
    def run(ctx: OpContext, op: Operator) -> None:
        col = _read_column(ctx, op.input1).astype(float)
        if len(col) == 0:
            raise UserError(f"{op.type}: the table is empty")
        if kind == "max":
            v = col.max()
        elif kind == "min":
            v = col.min()
        elif kind == "avg":
            v = col.mean()
        else:
            n = int(round(_num(ctx, op.input2)))
            if n == 0 or abs(n) > len(col):
                raise UserError(f"float=star_table_sort_idx: N={n} must be 1..{len(col)} or "
                                f"-1..-{len(col)}")
            order = col.to_numpy().argsort(kind="stable")
            v = order[n - 1] if n > 0 else order[len(col) + n]
        _set(ctx, op.output, float(v))
    return run


def _op_count_images(ctx: OpContext, op: Operator) -> None:
    table = "particles"
    if op.input2 not in (UNDEF, ""):
        table = str(ctx.scheme.strings[op.input2].value) if op.input2 in ctx.scheme.strings \
            else op.input2
    _set(ctx, op.output, count_rows(ctx.path(_str(ctx, op.input1)), table))


def _op_nth_word(ctx: OpContext, op: Operator) -> None:
    words = _split_words(_str(ctx, op.input1))
    n = int(round(_num(ctx, op.input2)))
    idx = n - 1 if n > 0 else len(words) + n
    _set(ctx, op.output, words[idx] if n != 0 and 0 <= idx < len(words) else UNDEF)


def _op_glob(ctx: OpContext, op: Operator) -> None:
    pattern = _str(ctx, op.input1)
    absolute = Path(pattern).is_absolute()
    hits = sorted(_glob.glob(str(ctx.path(pattern))))
    if not absolute:
        hits = [os.path.relpath(h, ctx.project) for h in hits]
    _set(ctx, op.output, ",".join(hits) if hits else UNDEF)


def _split_around(where: str, first: bool):
    def run(ctx: OpContext, op: Operator) -> None:
        text, sep = _str(ctx, op.input1), _str(ctx, op.input2)
        i = text.find(sep) if first else text.rfind(sep)
        if i < 0 or sep == "":
            # RELION's FileName helpers: before* gives the whole string, after* an empty one
            _set(ctx, op.output, text if where == "before" else "")
            return
        _set(ctx, op.output, text[:i] if where == "before" else text[i + len(sep):])
    return run


def _op_touch(ctx: OpContext, op: Operator) -> None:
    p = ctx.path(_str(ctx, op.input1))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.touch()
    log.info("touched %s", p)


def _copy_or_move(move: bool):
    def run(ctx: OpContext, op: Operator) -> None:
        src, dst = ctx.path(_str(ctx, op.input1)), ctx.path(_str(ctx, op.input2))
        if not src.exists():
            raise UserError(f"{op.type}: {src} does not exist")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if move:
            shutil.move(str(src), str(dst))
        elif src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
        log.info("%s %s -> %s", "moved" if move else "copied", src, dst)
    return run


def _op_delete(ctx: OpContext, op: Operator) -> None:
    p = ctx.path(_str(ctx, op.input1))
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)
    log.info("deleted %s", p)


def _op_wait(ctx: OpContext, op: Operator) -> None:
    now = ctx.clock.now()
    if ctx.wait_stamp is not None:
        elapsed = now - ctx.wait_stamp
        if op.output in ctx.scheme.floats:
            ctx.scheme.floats[op.output].value = float(elapsed)
        remaining = _num(ctx, op.input1) - elapsed
        if remaining > 0:
            log.info("waiting %.0f s", remaining)
            deadline = now + remaining
            while True:
                if ctx.abort_requested():
                    raise AbortRequested("abort requested while waiting")
                left = deadline - ctx.clock.now()
                if left <= 0:
                    break
                ctx.clock.sleep(min(ctx.poll_s, left))
    ctx.wait_stamp = ctx.clock.now()


def _op_exit_maxtime(ctx: OpContext, op: Operator) -> None:
    now = ctx.clock.now()
    if ctx.exit_time is None:
        ctx.exit_time = now + _num(ctx, op.input1) * 3600.0
        log.info("exit time set %.0f s from now", ctx.exit_time - now)
    elif now >= ctx.exit_time:
        raise StopScheme("the scheme reached its maximum run time")


def _op_exit(ctx: OpContext, op: Operator) -> None:
    raise StopScheme("the scheme reached an exit node")


def _var_text(ctx: OpContext, name: str) -> str:
    s = ctx.scheme
    if name in s.bools:
        return "True" if s.bools[name].value else "False"
    if name in s.floats:
        return float_text(float(s.floats[name].value))
    return str(s.strings[name].value) if name in s.strings else name


def send_email(scheme: Scheme, subject: str, body: str) -> bool:
    """Mail ``body`` to the address in the string variable ``email`` via the local MTA.

    Returns False (with one clear log line) when there is no address or no local mail set-up.
    """
    to = str(scheme.strings["email"].value) if "email" in scheme.strings else ""
    if not to or to in (UNDEF, "None"):
        log.info("no e-mail sent: scheme %s has no 'email' string variable", scheme.name)
        return False
    msg = EmailMessage()
    msg["Subject"], msg["To"], msg["From"] = subject, to, "scopeside@localhost"
    msg.set_content(body)
    sendmail = shutil.which("sendmail") or ("/usr/sbin/sendmail"
                                            if os.path.exists("/usr/sbin/sendmail") else None)
    try:
        if sendmail:
            import subprocess

            subprocess.run([sendmail, "-t", "-oi"], input=msg.as_bytes(), check=True,
                           timeout=30, capture_output=True)
        else:
            with smtplib.SMTP("localhost", timeout=5) as smtp:
                smtp.send_message(msg)
    except (OSError, smtplib.SMTPException, Exception) as exc:  # noqa: BLE001 - mail is best effort
        log.warning("no e-mail sent to %s: no working local mail set-up (%s)", to, exc)
        return False
    log.info("e-mail sent to %s", to)
    return True


def _op_email(ctx: OpContext, op: Operator) -> None:
    lines = [time.ctime(ctx.clock.now()), f"input1: {op.input1} = {_var_text(ctx, op.input1)}"]
    if op.input2 not in (UNDEF, ""):
        lines.append(f"input2: {op.input2} = {_var_text(ctx, op.input2)}")
    send_email(ctx.scheme, f"Scheme: {ctx.scheme.name}", "\n".join(lines) + "\n")


OPERATIONS: dict[str, Callable[[OpContext, Operator], None]] = {
    "bool=set": lambda c, o: _set(c, o.output, _bool(c, o.input1)),
    "bool=and": lambda c, o: _set(c, o.output, _bool(c, o.input1) and _bool(c, o.input2)),
    "bool=or": lambda c, o: _set(c, o.output, _bool(c, o.input1) or _bool(c, o.input2)),
    "bool=not": lambda c, o: _set(c, o.output, not _bool(c, o.input1)),
    "bool=gt": _cmp(lambda a, b: a > b),
    "bool=lt": _cmp(lambda a, b: a < b),
    "bool=ge": _cmp(lambda a, b: a >= b),
    "bool=le": _cmp(lambda a, b: a <= b),
    "bool=eq": _cmp(lambda a, b: abs(a - b) < 1e-8),
    "bool=file_exists": lambda c, o: _set(c, o.output, c.path(_str(c, o.input1)).exists()),
    "bool=read_star": _op_bool_read_star,
    "float=set": lambda c, o: _set(c, o.output, _num(c, o.input1)),
    "float=plus": _arith(lambda a, b: a + b),
    "float=minus": _arith(lambda a, b: a - b),
    "float=mult": _arith(lambda a, b: a * b),
    "float=divide": _arith(_divide),
    "float=round": lambda c, o: _set(c, o.output, _round_half_away(_num(c, o.input1))),
    "float=count_images": _op_count_images,
    "float=count_words": lambda c, o: _set(c, o.output, len(_split_words(_str(c, o.input1)))),
    "float=read_star": _op_float_read_star,
    "float=star_table_max": _stat("max"),
    "float=star_table_min": _stat("min"),
    "float=star_table_avg": _stat("avg"),
    "float=star_table_sort_idx": _stat("sort"),
    "string=set": lambda c, o: _set(c, o.output, _str(c, o.input1)),
    "string=join": lambda c, o: _set(c, o.output, _str(c, o.input1) + _str(c, o.input2)),
    "string=before_first": _split_around("before", True),
    "string=after_first": _split_around("after", True),
    "string=before_last": _split_around("before", False),
    "string=after_last": _split_around("after", False),
    "string=glob": _op_glob,
    "string=nth_word": _op_nth_word,
    "string=read_star": _op_string_read_star,
    "touch_file": _op_touch,
    "copy_file": _copy_or_move(False),
    "move_file": _copy_or_move(True),
    "delete_file": _op_delete,
    "wait": _op_wait,
    "exit_maxtime": _op_exit_maxtime,
    "exit": _op_exit,
    "email": _op_email,
}


def execute(ctx: OpContext, name: str) -> None:
    """Run operator ``name``; raises :class:`StopScheme` when it ends the run."""
    op = ctx.scheme.operators[name]
    fn = OPERATIONS.get(op.type)
    if fn is None:
        raise UserError(f"scheme {ctx.scheme.name}: operator {name} has unknown type {op.type!r}")
    fn(ctx, op)
    if op.output not in (UNDEF, "") and ctx.scheme.variable_kind(op.output):
        log.info("%s: %s -> %s", name, op.output, _var_text(ctx, op.output))
