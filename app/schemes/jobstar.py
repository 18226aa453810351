"""Read and write RELION 4 ``job.star`` files (``data_job`` + ``data_joboptions_values``).

The layout is RELION 4's byte for byte (see :mod:`app.schemes.starfmt`)::

    data_job
    _rlnJobTypeLabel             relion.class2d
    _rlnJobIsContinue                       0
    _rlnJobIsTomo                           0
    data_joboptions_values
    loop_
    _rlnJobOptionVariable #1
    _rlnJobOptionValue #2
    nr_classes        100

Options are written in the order they are held (RELION writes them sorted by name; a file
read from RELION therefore comes back in RELION's order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from app.errors import UserError
from app.schemes import starfmt


@dataclass
class JobStar:
    type_label: str
    is_continue: bool = False
    is_tomo: bool = False
    options: dict[str, str] = field(default_factory=dict)


def format_job_star(js: JobStar) -> str:
    """The text RELION 4 writes for this job."""
    head = starfmt.format_list("job", [("rlnJobTypeLabel", js.type_label),
                                       ("rlnJobIsContinue", bool(js.is_continue)),
                                       ("rlnJobIsTomo", bool(js.is_tomo))])
    rows = [[k, str(v)] for k, v in js.options.items()]
    body = starfmt.format_loop("joboptions_values", ["rlnJobOptionVariable", "rlnJobOptionValue"],
                               rows)
    return head + body


def write_job_star(path: Path, js: JobStar) -> None:
    """Write atomically (temporary file, then rename)."""
    starfmt.atomic_write(path, format_job_star(js))


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "yes", "true")


def parse_job_star(text: str, path: Path | str = "<text>") -> JobStar:
    """Parse job.star text (RELION 4 layout; RELION 3.1's ``_rlnJobType`` number is accepted)."""
    path = Path(path)
    blocks = starfmt.parse(text, path)
    job = blocks.get("job")
    if job is None:
        raise UserError(f"{path}: not a RELION job.star (no data_job block)")
    label = job.pairs.get("rlnJobTypeLabel", "")
    if not label:
        raise UserError(f"{path}: not a RELION job.star (no _rlnJobTypeLabel)")
    js = JobStar(type_label=label, is_continue=_truthy(job.pairs.get("rlnJobIsContinue", "0")),
                 is_tomo=_truthy(job.pairs.get("rlnJobIsTomo", "0")))
    opts = blocks.get("joboptions_values")
    if opts is not None:
        try:
            ki = opts.labels.index("rlnJobOptionVariable")
            vi = opts.labels.index("rlnJobOptionValue")
        except ValueError:
            raise UserError(f"{path}: data_joboptions_values lacks _rlnJobOptionVariable/"
                            "_rlnJobOptionValue") from None
        for row in opts.rows:
            js.options[row[ki]] = row[vi]
    return js


def read_job_star(path: Path) -> JobStar:
    """Parse a RELION 4 job.star (key/value block + options loop)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"{path}: cannot read job.star ({exc.strerror})") from None
    return parse_job_star(text, path)
