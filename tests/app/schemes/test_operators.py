"""Every operator type against known answers (RELION 4 semantics, literals and negatives fixed)."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from app.errors import UserError
from app.schemes.model import Operator, Scheme, Var
from app.schemes.operators import AbortRequested, OpContext, StopScheme, execute
from metadata.star import write_star
from tests.app.schemes.conftest import FakeClock


@pytest.fixture
def ctx(tmp_path):
    s = Scheme("t")
    s.floats = {k: Var(v, v) for k, v in {"a": 7.0, "b": 2.0, "out": 0.0, "n": -1.0,
                                           "zero": 0.0, "wait_s": 100.0, "hours": 1.0}.items()}
    s.bools = {k: Var(v, v) for k, v in {"t": True, "f": False, "r": False}.items()}
    s.strings = {k: Var(v, v) for k, v in {
        "words": "alpha,beta,gamma", "sep": ",", "s": "", "slash": "/",
        "path": "Sub/dir/file.star", "star": "mics.star,micrographs,rlnCtfMaxResolution",
        "name_star": "mics.star,micrographs,rlnMicrographName", "missing": "nope.star",
        "tbl": "micrographs", "pattern": "Movies/*.tiff", "dst": "Copies/deep/file.star",
        "micsfile": "mics.star", "undef": "undefined"}.items()}
    write_star(tmp_path / "mics.star", {"micrographs": pd.DataFrame(
        {"rlnMicrographName": ["m1.mrc", "m2.mrc", "m3.mrc"],
         "rlnCtfMaxResolution": [4.5, 3.0, 8.25]})})
    return OpContext(s, tmp_path, clock=FakeClock())


def run(ctx, typ, out="undefined", in1="undefined", in2="undefined"):
    ctx.scheme.operators["OP"] = Operator(typ, out, in1, in2)
    execute(ctx, "OP")
    s = ctx.scheme
    for table in (s.floats, s.bools, s.strings):
        if out in table:
            return table[out].value
    return None


@pytest.mark.parametrize("typ,in1,in2,expect", [
    ("bool=and", "t", "f", False), ("bool=or", "t", "f", True), ("bool=not", "f", "", True),
    ("bool=set", "t", "", True),
    ("bool=gt", "a", "b", True), ("bool=lt", "a", "b", False), ("bool=ge", "b", "2", True),
    ("bool=le", "a", "6.5", False), ("bool=eq", "b", "2.000000001", True),
    ("bool=eq", "b", "2.001", False),
    ("bool=gt", "a", "5", True),    # a literal is its number (RELION reads it as 0)
    ("bool=gt", "a", "10", False),  # ... so this differs from RELION, which says True
])
def test_bool_operators(ctx, typ, in1, in2, expect):
    assert run(ctx, typ, "r", in1, in2 or "undefined") is expect


@pytest.mark.parametrize("typ,in1,in2,expect", [
    ("float=set", "a", "", 7.0), ("float=plus", "a", "b", 9.0), ("float=minus", "a", "b", 5.0),
    ("float=mult", "a", "b", 14.0), ("float=divide", "a", "b", 3.5),
    ("float=plus", "a", "0.5", 7.5), ("float=mult", "a", "-2", -14.0),
    ("float=round", "n", "", -1.0),
])
def test_float_arithmetic(ctx, typ, in1, in2, expect):
    assert run(ctx, typ, "out", in1, in2 or "undefined") == pytest.approx(expect)


def test_round_half_away_from_zero(ctx):
    ctx.scheme.floats["a"].value = 2.5
    assert run(ctx, "float=round", "out", "a") == 3.0
    ctx.scheme.floats["a"].value = -2.5
    assert run(ctx, "float=round", "out", "a") == -3.0


def test_divide_by_zero_is_a_clear_error(ctx):
    with pytest.raises(UserError, match="division by zero"):
        run(ctx, "float=divide", "out", "a", "zero")


def test_star_reading_operators(ctx):
    assert run(ctx, "float=read_star", "out", "star") == 4.5
    assert run(ctx, "float=read_star", "out", "star", "2") == 8.25
    assert run(ctx, "string=read_star", "s", "name_star", "1") == "m2.mrc"
    assert run(ctx, "bool=read_star", "r", "star") is True
    assert run(ctx, "float=star_table_max", "out", "star") == 8.25
    assert run(ctx, "float=star_table_min", "out", "star") == 3.0
    assert run(ctx, "float=star_table_avg", "out", "star") == pytest.approx(15.75 / 3)
    # sort_idx: 1 = smallest ... -1 = largest; answers are 0-based rows
    assert run(ctx, "float=star_table_sort_idx", "out", "star", "1") == 1
    assert run(ctx, "float=star_table_sort_idx", "out", "star", "-1") == 2
    assert run(ctx, "float=star_table_sort_idx", "out", "star", "2") == 0
    with pytest.raises(UserError, match="3 rows; row 5"):
        run(ctx, "float=read_star", "out", "star", "5")


def test_count_images_and_words(ctx):
    assert run(ctx, "float=count_images", "out", "micsfile", "tbl") == 3
    assert run(ctx, "float=count_images", "out", "micsfile") == 0  # no particles table
    assert run(ctx, "float=count_images", "out", "missing", "tbl") == 0
    assert run(ctx, "float=count_words", "out", "words") == 3
    assert run(ctx, "float=count_words", "out", "undef") == 0


@pytest.mark.parametrize("n,expect", [("1", "alpha"), ("3", "gamma"), ("4", "undefined"),
                                      ("-1", "gamma"), ("-3", "alpha"), ("-4", "undefined"),
                                      ("0", "undefined")])
def test_nth_word_with_negatives(ctx, n, expect):
    assert run(ctx, "string=nth_word", "s", "words", n) == expect


def test_string_operators(ctx):
    assert run(ctx, "string=join", "s", "words", "sep") == "alpha,beta,gamma,"
    assert run(ctx, "string=before_first", "s", "path", "slash") == "Sub"
    assert run(ctx, "string=after_first", "s", "path", "slash") == "dir/file.star"
    assert run(ctx, "string=before_last", "s", "path", "slash") == "Sub/dir"
    assert run(ctx, "string=after_last", "s", "path", "slash") == "file.star"
    assert run(ctx, "string=set", "s", "words") == "alpha,beta,gamma"
    assert run(ctx, "string=glob", "s", "pattern") == "undefined"
    (ctx.project / "Movies").mkdir()
    for n in ("b.tiff", "a.tiff", "c.eer"):
        (ctx.project / "Movies" / n).touch()
    assert run(ctx, "string=glob", "s", "pattern") == "Movies/a.tiff,Movies/b.tiff"


def test_file_operators(ctx):
    p = ctx.project
    assert run(ctx, "bool=file_exists", "r", "path") is False
    run(ctx, "touch_file", in1="path")
    assert (p / "Sub/dir/file.star").exists()
    assert run(ctx, "bool=file_exists", "r", "path") is True
    (p / "Sub/dir/file.star").write_text("x")
    run(ctx, "copy_file", in1="path", in2="dst")
    assert (p / "Copies/deep/file.star").read_text() == "x"
    ctx.scheme.strings["dst"].value = "Moved/file.star"
    run(ctx, "move_file", in1="path", in2="dst")
    assert (p / "Moved/file.star").exists() and not (p / "Sub/dir/file.star").exists()
    run(ctx, "delete_file", in1="dst")
    assert not (p / "Moved/file.star").exists()


def test_wait_stamps_then_sleeps_the_remainder(ctx):
    clock = ctx.clock
    t0 = clock.now()
    run(ctx, "wait", "out", "wait_s")  # first visit: stamp only
    assert clock.now() == t0 and clock.slept == []
    clock.t += 30  # 30 s of work between visits
    run(ctx, "wait", "out", "wait_s")
    assert clock.now() == pytest.approx(t0 + 100)
    assert ctx.scheme.floats["out"].value == pytest.approx(30)  # elapsed since the stamp
    clock.t += 150  # more than wait_s passed: no sleep
    n = len(clock.slept)
    run(ctx, "wait", "out", "wait_s")
    assert len(clock.slept) == n


def test_wait_stops_on_abort(ctx):
    run(ctx, "wait", in1="wait_s")
    checks = iter([False, False, False])
    ctx.abort_requested = lambda: next(checks, True)  # the fourth check sees an abort
    with pytest.raises(AbortRequested):
        run(ctx, "wait", in1="wait_s")
    assert ctx.clock.now() - 1_000_000.0 < 100


def test_exit_maxtime_and_exit(ctx):
    run(ctx, "exit_maxtime", in1="hours")  # sets the deadline one hour ahead
    ctx.clock.t += 3599
    run(ctx, "exit_maxtime", in1="hours")
    ctx.clock.t += 1
    with pytest.raises(StopScheme):
        run(ctx, "exit_maxtime", in1="hours")
    with pytest.raises(StopScheme):
        run(ctx, "exit")


def test_email_without_address_is_a_log_line_not_an_error(ctx, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        run(ctx, "email", in1="a", in2="t")
    assert "no 'email' string variable" in caplog.text


def test_paths_in_string_inputs_are_rewritten(ctx):
    ctx.rewrite = lambda s: s.replace("Sub/dir/", "Import/job001/")
    (ctx.project / "Import/job001").mkdir(parents=True)
    (ctx.project / "Import/job001/file.star").touch()
    assert run(ctx, "bool=file_exists", "r", "path") is True
    assert ctx.scheme.strings["path"].value == "Sub/dir/file.star"  # the variable is unchanged


def test_email_goes_through_the_local_sendmail(ctx, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sent = tmp_path / "sent.txt"
    fake = bin_dir / "sendmail"
    fake.write_text(f"#!/bin/sh\ncat > {sent}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    ctx.scheme.strings["email"] = Var("op@example.org", "op@example.org")
    run(ctx, "email", in1="a", in2="t")
    text = sent.read_text()
    assert "To: op@example.org" in text and "Subject: Scheme: t" in text
    assert "input1: a = 7" in text and "input2: t = True" in text
