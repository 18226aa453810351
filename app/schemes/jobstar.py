"""Read and write RELION 4 ``job.star`` files (``data_job`` + ``data_joboptions_values``)."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import UserError


@dataclass
class JobStar:
    type_label: str
    is_continue: bool = False
    is_tomo: bool = False
    options: dict[str, str] = field(default_factory=dict)


def _quote(v: str) -> str:
    v = str(v)
    if v == "" :
        return '""'
    if any(c.isspace() for c in v) or v.startswith(("#", "_", ";")) or '"' in v:
        return '"' + v.replace('"', "'") + '"'
    return v


def format_job_star(js: JobStar) -> str:
    lines = ["", "# version 40000", "", "data_job", ""]
    lines.append(f"_rlnJobTypeLabel             {js.type_label}")
    lines.append(f"_rlnJobIsContinue                       {int(js.is_continue)}")
    lines.append(f"_rlnJobIsTomo                           {int(js.is_tomo)}")
    lines += [" ", "", "# version 40000", "", "data_joboptions_values", "", "loop_ ",
              "_rlnJobOptionVariable #1 ", "_rlnJobOptionValue #2 "]
    width = max([len(k) for k in js.options] + [1])
    for k, v in js.options.items():
        lines.append(f"{k:<{width}} {_quote(v)} ")
    lines.append(" ")
    return "\n".join(lines) + "\n"


def write_job_star(path: Path, js: JobStar) -> None:
    """Write atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(format_job_star(js), encoding="utf-8")
    os.replace(tmp, path)


def read_job_star(path: Path) -> JobStar:
    """Parse a RELION 4 job.star (key/value block + options loop)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"{path}: cannot read job.star ({exc.strerror})") from None
    block = None
    js = JobStar(type_label="")
    in_loop = False
    ncols = 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            block = line[5:]
            in_loop = False
            ncols = 0
            continue
        if line.startswith("loop_"):
            in_loop = True
            continue
        if block == "job" and line.startswith("_rln"):
            parts = shlex.split(line)
            key, val = parts[0], parts[1] if len(parts) > 1 else ""
            if key == "_rlnJobTypeLabel":
                js.type_label = val
            elif key == "_rlnJobIsContinue":
                js.is_continue = val.strip() in ("1", "Yes", "true")
            elif key == "_rlnJobIsTomo":
                js.is_tomo = val.strip() in ("1", "Yes", "true")
            continue
        if block == "joboptions_values" and in_loop:
            if line.startswith("_rln"):
                ncols += 1
                continue
            try:
                parts = shlex.split(line)
            except ValueError:
                parts = line.split(None, 1)
            if len(parts) == 1:
                parts.append("")
            js.options[parts[0]] = parts[1]
    if not js.type_label:
        raise UserError(f"{path}: not a RELION job.star (no _rlnJobTypeLabel)")
    return js
