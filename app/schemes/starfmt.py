"""RELION 4's own STAR text layout for the small control files (scheme.star, job.star, pipeline).

RELION writes these through ``MetaDataTable::write``; to round-trip them byte for byte we
format cells the way it does:

- every block starts ``\\n# version 30001\\n\\ndata_NAME\\n\\n`` and ends with ``" \\n"``;
- a key/value block pads each label to ``12 + max(10, longest label)`` columns;
- a loop block writes ``loop_ `` and ``_label #i `` lines, then each row as cells
  right-aligned in 10 columns, each followed by one space;
- floats are ``%12.6f`` (``%12.5f`` when negative; ``e`` format below 0.001 or above 1e5),
  ints and bools ``%12d``, strings as they are (quoted when empty or holding whitespace).

Reading uses a small tokenizer rather than :mod:`starfile`: these files must keep every value
as the exact text written (``007``, ``None``, ``""``, ``undefined``), which pandas' type
inference would change. Data tables produced by jobs are read with :mod:`metadata.star`.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import UserError

VERSION = 30001


def escape(value: str) -> str:
    """A string cell as RELION writes it: ``""`` when empty, double-quoted with whitespace."""
    v = str(value)
    if v == "":
        return '""'
    if v[0] in "\"'" or any(c in v for c in " \t"):
        return '"' + v + '"'
    return v


def fmt_float(v: float) -> str:
    a = abs(v)
    if (0.0 < a < 0.001) or a > 100000.0:
        return f"{v:12.5e}" if v < 0 else f"{v:12.6e}"
    return f"{v:12.5f}" if v < 0 else f"{v:12.6f}"


def fmt_int(v: int | bool) -> str:
    return f"{int(v):12d}"


def fmt_cell(v: object) -> str:
    if isinstance(v, bool):
        return fmt_int(v)
    if isinstance(v, int):
        return fmt_int(v)
    if isinstance(v, float):
        return fmt_float(v)
    return escape(str(v))


def block_header(name: str, version: int = VERSION) -> str:
    return f"\n# version {version}\n\ndata_{name}\n\n"


def format_list(name: str, items: list[tuple[str, object]], version: int = VERSION) -> str:
    """A key/value block; ``items`` are (label without leading underscore, value)."""
    width = max([10] + [len(k) for k, _ in items])
    out = [block_header(name, version)]
    for k, v in items:
        out.append("_" + k + " " * (12 + width - len(k)) + fmt_cell(v) + "\n")
    out.append(" \n")
    return "".join(out)


def format_loop(name: str, labels: list[str], rows: list[list[object]],
                version: int = VERSION) -> str:
    """A loop block; ``labels`` without the leading underscore."""
    out = [block_header(name, version), "loop_ \n"]
    out += [f"_{lab} #{i} \n" for i, lab in enumerate(labels, 1)]
    for row in rows:
        out.append("".join(f"{fmt_cell(v):>10} " for v in row) + "\n")
    out.append(" \n")
    return "".join(out)


@dataclass
class Block:
    """One parsed data block: ``pairs`` for a key/value block, ``labels`` + ``rows`` for a loop."""

    name: str
    pairs: dict[str, str] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    is_loop: bool = False
    #: the number of the ``# version N`` line before the block (None when there is none)
    version: int | None = None

    def records(self) -> list[dict[str, str]]:
        if not self.is_loop:
            return [dict(self.pairs)]
        return [dict(zip(self.labels, r)) for r in self.rows]


def _split(line: str, path: Path, lineno: int) -> list[str]:
    if '"' not in line and "'" not in line:
        return line.split()
    try:
        lex = shlex.shlex(line, posix=True)
        lex.whitespace_split = True
        lex.commenters = ""
        lex.escape = ""
        return list(lex)
    except ValueError:
        raise UserError(f"{path}:{lineno}: unbalanced quotes") from None


def parse(text: str, path: Path | str = "<text>") -> dict[str, Block]:
    """Parse STAR text into blocks (values kept as text, quotes removed)."""
    path = Path(path)
    blocks: dict[str, Block] = {}
    cur: Block | None = None
    in_header = False
    version: int | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if line.startswith("# version "):
                words = line.split()
                if len(words) > 2 and words[2].isdigit():
                    version = int(words[2])
            continue
        if line.startswith("data_"):
            cur = Block(line[5:].strip(), version=version)
            blocks[cur.name] = cur
            in_header = False
            continue
        if cur is None:
            raise UserError(f"{path}:{lineno}: text before the first data_ block")
        if line.startswith("loop_"):
            cur.is_loop = True
            in_header = True
            continue
        if line.startswith("_"):
            parts = _split(line, path, lineno)
            label = parts[0][1:]
            if cur.is_loop and in_header:
                cur.labels.append(label)
            else:
                cur.pairs[label] = parts[1] if len(parts) > 1 else ""
            continue
        if cur.is_loop:
            in_header = False
            cells = _split(line, path, lineno)
            if len(cells) != len(cur.labels):
                raise UserError(f"{path}:{lineno}: table data_{cur.name} row has {len(cells)} "
                                f"values for {len(cur.labels)} columns")
            cur.rows.append(cells)
            continue
        raise UserError(f"{path}:{lineno}: unexpected line {line[:60]!r}")
    return blocks


def read(path: str | Path) -> dict[str, Block]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{p}: file not found") from None
    except OSError as exc:
        raise UserError(f"{p}: cannot read ({exc.strerror})") from None
    return parse(text, p)


def atomic_write(path: str | Path, text: str, exchange: bool = False) -> None:
    """Write so readers never see half a file: a temporary file, then a rename.

    ``exchange=True`` (for files rewritten many times a second, e.g. scheme.star) swaps the
    new file in with ``renameat2(RENAME_EXCHANGE)`` and keeps the previous content as
    ``.<name>.prev``: just as atomic, but ext4 does not flush a file renamed *over* another
    one when the names are exchanged (0.3 ms instead of 3 ms per write here). Falls back to
    a plain rename where the call is not supported (other OS, NFS, first write).
    """
    p = Path(path)
    if exchange and p.exists() and _exchange_supported():
        prev = p.with_name(f".{p.name}.prev")
        try:
            prev.unlink()
        except FileNotFoundError:
            pass
        with open(prev, "w", encoding="utf-8") as fh:  # a new file: no flush-on-truncate
            fh.write(text)
        if _renameat2_exchange(prev, p):
            return
        os.replace(prev, p)
        return
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, p)


_EXCHANGE: list = []  # [libc renameat2] once probed, [None] when unavailable


def _exchange_supported() -> bool:
    if not _EXCHANGE:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            _EXCHANGE.append(fn)
        except (OSError, AttributeError):
            _EXCHANGE.append(None)
    return _EXCHANGE[0] is not None


def _renameat2_exchange(a: Path, b: Path) -> bool:
    at_fdcwd, rename_exchange = -100, 2
    return _EXCHANGE[0](at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def normalise(text: str) -> list[str]:
    """Tokens of a STAR text with whitespace removed (for "identical apart from whitespace")."""
    return text.split()
