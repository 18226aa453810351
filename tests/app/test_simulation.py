"""Simulated data on disk: formats readable by metadata/, truth beside the data, CLI."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import tifffile

from app.cli import run
from app.simulation.session import SessionSpec, write_epu_session_sim, write_serialem_session_sim
from app.simulation.writers import write_micrograph_set, write_movie, write_particle_set
from compute.simulate.micrograph import simulate_micrograph
from compute.simulate.particles import simulate_particles
from metadata.frames import read_gain
from metadata.star import read_star

TINY = SessionSpec(shape=(128, 128), n_frames=4, seed=3, n_hot=2, n_dead=2,
                   movie_kw=dict(molecules=["small"], n_particles=3))


@pytest.mark.parametrize("fmt", ["tiff", "mrc"])
def test_movie_round_trip(tmp_path, fmt):
    frames = np.random.default_rng(0).poisson(1.0, (3, 40, 48)).astype(np.uint8)
    p = write_movie(tmp_path / f"m.{fmt}", frames, 1.1)
    if fmt == "tiff":
        with tifffile.TiffFile(p) as tf:
            assert len(tf.pages) == 3 and tf.pages[0].compression == 5  # LZW
            # stored flipped in Y: TIFF's origin is top-left, and RELION, MotionCor2 and IMOD
            # flip TIFF movies when they read them
            back = tf.asarray()[:, ::-1]
    else:
        with mrcfile.open(p) as m:
            back = np.asarray(m.data)
            assert m.header.mode == 0 and abs(float(m.voxel_size.x) - 1.1) < 1e-5
            assert m.is_image_stack()
    np.testing.assert_array_equal(back.astype(np.uint8), frames)
    from metadata.frames import open_movie

    with open_movie(p) as mv:  # frames read back as simulated, whatever the format
        np.testing.assert_array_equal(np.stack([mv[i] for i in range(3)]).astype(np.uint8),
                                      frames)


def test_particle_set_star_stack_and_truth(tmp_path):
    stack = simulate_particles(30, ["asym", "d2"], box=32, junk_fraction=0.3, seed=1)
    write_particle_set(tmp_path, stack)
    blocks = read_star(tmp_path / "particles.star")
    parts = blocks["particles"]
    assert len(parts) == 30 and parts["rlnImageName"][0] == "000001@particles.mrcs"
    assert "rlnAngleRot" not in parts.columns
    assert float(blocks["optics"]["rlnImageSize"][0]) == 32
    with mrcfile.open(tmp_path / "particles.mrcs") as m:
        np.testing.assert_allclose(m.data, stack.images, atol=1e-6)
    truth = read_star(tmp_path / "ground_truth" / "particles_truth.star")["particles"]
    np.testing.assert_allclose(truth["rlnDefocusU"], stack.truth.ctf.defocus_u_a, rtol=1e-6)
    assert list(truth["scsKind"]) == list(stack.truth.kind)
    good = stack.truth.kind == "particle"
    np.testing.assert_allclose(truth["rlnAngleTilt"][good], stack.truth.tilt_deg[good],
                               atol=1e-5)
    js = json.loads((tmp_path / "ground_truth" / "particles_truth.json").read_text())
    assert js["box"] == 32 and len(js["particles"]["scsKind"]) == 30


def test_micrograph_set(tmp_path):
    mics = [simulate_micrograph(128, pixel_size_a=2.0, molecules=["small"], seed=s,
                                n_particles=4) for s in (1, 2)]
    write_micrograph_set(tmp_path, mics)
    mstar = read_star(tmp_path / "micrographs.star")
    assert list(mstar["micrographs"]["rlnMicrographName"]) == [
        "Micrographs/mic_00001.mrc", "Micrographs/mic_00002.mrc"]
    assert float(mstar["optics"]["rlnMicrographPixelSize"][0]) == 2.0
    tr = read_star(tmp_path / "ground_truth" / "micrographs_truth.star")["micrographs"]
    assert np.isclose(tr["rlnDefocusU"][1], mics[1].truth.ctf.defocus_u_a)
    coords = read_star(tmp_path / "ground_truth" / "coordinates_truth.star")["particles"]
    n = sum(len(m.truth.particles["x_px"]) for m in mics)
    assert len(coords) == n
    with mrcfile.open(tmp_path / "Micrographs" / "mic_00002.mrc") as m:
        np.testing.assert_allclose(m.data, mics[1].image)


def test_epu_session_is_read_by_metadata(tmp_path):
    from metadata.session import item_record, open_session

    movies = write_epu_session_sim(tmp_path / "epu", TINY, holes_per_square=1, shots_per_hole=2,
                                   movie_root=tmp_path / "store")
    assert len(movies) == 2 and all(m.movie_path.is_file() for m in movies)
    idx = open_session(tmp_path / "epu", movie_roots=[tmp_path / "store"])
    assert idx.kind == "epu" and idx.n_movies == 2 and not idx.metadata_without_movie
    rec = item_record(idx.items[0])
    assert rec.n_frames == 4 and rec.pixel_size_a == 1.0 and rec.voltage_kv == 300.0
    assert abs(rec.total_dose_e_a2 - 4.0) < 1e-6
    truth = read_star(tmp_path / "epu" / "ground_truth" / "movies_truth.star")["movies"]
    assert len(truth) == 2
    # nominal defocus in the XML is the true mean defocus rounded to 0.25 um
    true_mean = 0.5 * (truth["rlnDefocusU"][0] + truth["rlnDefocusV"][0]) / 1e4
    assert abs(-rec.defocus_um - true_mean) <= 0.125 + 1e-9
    with mrcfile.open(tmp_path / "store" / "gain_reference.mrc") as m:
        assert m.data.shape == (128, 128)
    # seeded: writing again gives identical movies
    again = write_epu_session_sim(tmp_path / "epu2", TINY, holes_per_square=1, shots_per_hole=2)
    a = tifffile.imread(movies[1].movie_path)
    b = tifffile.imread(again[1].movie_path)
    np.testing.assert_array_equal(a, b)


def test_serialem_session_with_drip(tmp_path):
    import threading
    import time

    from metadata.session import item_record, open_session

    seen: dict[str, float] = {}
    done = threading.Event()

    def sweep():
        now = time.monotonic()  # one time per sweep: files found together tie
        for f in tmp_path.glob("sim_*"):
            seen.setdefault(f.name, now)

    def watch():  # what an on-the-fly watcher would see, polled every 10 ms
        while not done.is_set():
            sweep()
            time.sleep(0.01)

    th = threading.Thread(target=watch)
    th.start()
    try:
        written = write_serialem_session_sim(tmp_path, TINY, n_movies=2, interval_s=0.8)
    finally:
        done.set()
        th.join()
    sweep()
    (m1, d1), (m2, d2) = written
    assert seen[m2.name] - seen[m1.name] >= 0.4  # 0.8 s apart; slack for a loaded machine
    assert seen[d1.name] <= seen[m1.name] and seen[d2.name] <= seen[m2.name]
    assert not list(tmp_path.glob(".*.part")) and not tmp_path.with_name(
        f".{tmp_path.name}.staging").exists()
    idx = open_session(tmp_path)
    assert idx.kind == "serialem" and idx.n_movies == 2
    rec = item_record(idx.items[1])
    assert rec.n_frames == 4 and rec.gain_reference == "CountRef_sim.dm4"
    gain = read_gain(tmp_path / "CountRef_sim.dm4")
    assert gain.shape == TINY.shape and 0.5 < gain.min() <= gain.max() < 2.0
    lines = (tmp_path / "defects.txt").read_text().split("\n")
    assert len([x for x in lines if x]) == 4
    shifts = read_star(tmp_path / "ground_truth" / "sim_00001_shifts.star")["global_shift"]
    assert len(shifts) == 4 and shifts["rlnMicrographShiftX"][0] == 0


def test_epu_drip_with_growing_movies(tmp_path):
    out, store = tmp_path / "epu", tmp_path / "store"
    movies = write_epu_session_sim(out, TINY, holes_per_square=1, shots_per_hole=2,
                                   movie_root=store, interval_s=0.2, grow=True)
    assert all(m.movie_path.is_file() and m.xml_path.is_file() for m in movies)
    assert all(m.movie_path.is_relative_to(store) for m in movies)
    assert (store / "gain_reference.mrc").is_file() and (out / "EpuSession.dm").is_file()
    assert not any(p.name.endswith(".staging") for p in tmp_path.iterdir())
    js = json.loads((out / "ground_truth" / "session.json").read_text())
    assert js["movie_root"] == str(store)
    np.testing.assert_array_equal(tifffile.imread(movies[0].movie_path).shape, (4, 128, 128))


def test_cli_particles_and_bad_input(tmp_path, capsys):
    out = tmp_path / "p"
    assert run(["simulate", "particles", "--out", str(out), "--n", "12", "--box", "32",
                "--molecules", "small,d2", "--junk-fraction", "0.25", "--defocus", "1:2"]) == 0
    parts = read_star(out / "particles.star")["particles"]
    assert len(parts) == 12 and parts["rlnDefocusU"].between(0.9e4, 2.1e4).all()
    assert run(["simulate", "particles", "--out", str(out), "--molecules", "teapot"]) == 2
    assert "teapot" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["simulate", "particles", "--out", str(out), "--defocus", "3:1"])


def test_cli_user_map_and_movies(tmp_path):
    from compute.simulate.molecules import density_map, molecule
    from metadata.images import write_mrc

    write_mrc(tmp_path / "map.mrc", density_map(molecule("small"), 40, 1.5), pixel_size_a=1.5)
    out = tmp_path / "mv"
    assert run(["simulate", "movies", "--out", str(out), "--n", "1", "--size", "96",
                "--frames", "3", "--molecules", "small", "--map", str(tmp_path / "map.mrc"),
                "--pixel-size", "2.0", "--format", "mrc", "--particles", "4"]) == 0
    js = json.loads((out / "ground_truth" / "movie_00001.json").read_text())
    assert set(js["micrograph"]["particles"]["molecule"]) <= {"small", "map"}
    assert js["micrograph"]["box_px"]["map"] == 30
    with mrcfile.open(out / "Movies" / "movie_00001.mrc") as m:
        assert m.data.shape == (3, 96, 96)


@pytest.mark.parametrize("shape", [(1, 128), (1, 254), (37, 300), (64, 64)])
def test_eer_frames_decode_exactly(shape):
    import imagecodecs

    from app.simulation.eer import encode_eer_frame

    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.01, 0.3, 1.0):
        f = (rng.random(shape) < density).astype(np.uint8)
        if density == 0.01:
            f.ravel()[-1] = 1  # an electron on the very last pixel needs a closing code
        stream = encode_eer_frame(f, rng.integers(0, 16, int(f.sum())))
        assert len(stream) % 2 == 0
        back = imagecodecs.eer_decode(stream, shape, 7, 2, 2)
        np.testing.assert_array_equal(back.astype(np.uint8), f)


def test_eer_subpixel_codes_land_where_they_say():
    import imagecodecs

    from app.simulation.eer import encode_eer_frame

    f = np.zeros((16, 16), np.uint8)
    f[5, 7] = 1
    for code in range(16):
        sr = imagecodecs.eer_decode(encode_eer_frame(f, np.array([code])), (64, 64), 7, 2, 2,
                                    superres=2)
        (y,), (x,) = np.nonzero(sr)
        assert (y - 4 * 5, x - 4 * 7) == (code >> 2, code & 3)


def test_eer_movie_file(tmp_path):
    from app.simulation.eer import write_eer
    from metadata.movies import read_movie_header

    rng = np.random.default_rng(1)
    fractions = rng.poisson(0.3, (3, 64, 96)).astype(np.uint8)
    p = write_eer(tmp_path / "m.eer", fractions, eer_frames_per_fraction=10, pixel_size_a=0.9,
                  exposure_time_s=3.0, seed=2, hot_pixels=np.array([[5, 6]]))
    with tifffile.TiffFile(p) as tf:
        assert tf.is_eer and tf.series[0].kind == "eer"
        frames = tf.asarray().astype(np.int64)
    assert frames.shape == (30, 64, 96)
    assert frames[:, 5, 6].all()
    per_fraction = frames.reshape(3, 10, 64, 96).sum(axis=1)
    per_fraction[:, 5, 6] = 0
    ref = fractions.astype(np.int64)
    ref[:, 5, 6] = 0
    # every electron lands in its own fraction; only rare same-pixel coincidences merge
    assert (per_fraction <= ref).all() and per_fraction.sum() > 0.97 * ref.sum()
    h = read_movie_header(p)
    assert h.format == "eer" and h.n_frames == 30 and abs(h.pixel_size_a - 0.9) < 1e-9
    assert h.extended["exposure_time_s"] == 3.0


@pytest.mark.parametrize("up", [1, 2, 4])
def test_eer_open_movie_grouping_and_upsampling(tmp_path, up):
    """open_movie groups EER frames and renders 2x/4x super-resolution (tifffile's superres):
    every electron is kept and lands inside its physical pixel."""
    from app.simulation.eer import write_eer
    from metadata.frames import open_movie

    rng = np.random.default_rng(4)
    fractions = rng.poisson(0.2, (2, 32, 48)).astype(np.uint8)
    p = write_eer(tmp_path / "m.eer", fractions, eer_frames_per_fraction=5, seed=3)
    with tifffile.TiffFile(p) as tf:
        raw = tf.asarray().astype(np.int64)  # (10, 32, 48) event frames
    with open_movie(p, eer_grouping=5, eer_upsampling=up) as mv:
        assert len(mv) == 2 and mv.shape == (2, 32 * up, 48 * up)
        for i in range(2):
            fr = mv[i].astype(np.int64)
            binned = fr.reshape(32, up, 48, up).sum(axis=(1, 3))
            np.testing.assert_array_equal(binned, raw[5 * i: 5 * i + 5].sum(0))
