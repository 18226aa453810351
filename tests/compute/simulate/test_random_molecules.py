"""Random training molecules for the class ranker."""

import numpy as np
import pytest

from compute.errors import ComputeError
from compute.simulate.molecules import density_map, molecule
from compute.simulate.random_molecules import (
    DIAMETER_RANGE_A,
    get_molecule,
    random_molecule,
    variant_molecule,
)


def test_random_molecules_are_seeded_and_varied():
    a, b = random_molecule(3), random_molecule(3)
    assert a is b or np.array_equal(a.coords_a, b.coords_a)
    mols = [random_molecule(s) for s in range(30)]
    d = np.array([m.diameter_a for m in mols])
    assert d.min() >= 0.7 * DIAMETER_RANGE_A[0] and d.max() <= 1.3 * DIAMETER_RANGE_A[1]
    assert d.max() / d.min() > 2.5
    syms = {m.symmetry for m in mols}
    assert "C1" in syms and len(syms) >= 3
    # never the symmetries of the ranker's held-aside validation molecules
    assert not syms & {"C4", "D2"}
    for m in mols:
        assert 10 <= m.n_atoms <= 1.05 * 4000  # MAX_ATOMS, up to rounding per domain
        assert np.allclose((m.coords_a * m.weights[:, None]).sum(0) / m.weights.sum(), 0,
                           atol=1e-6)


def test_variant_differs_from_its_base_but_keeps_its_size():
    base = molecule("asym")
    v = variant_molecule("asym", 7)
    assert v.n_atoms <= base.n_atoms
    assert 0.6 * base.diameter_a < v.diameter_a < 1.5 * base.diameter_a
    assert v.name == "var:asym:7"


def test_get_molecule_names_and_rendering():
    assert get_molecule("rand:5").name == "rand:5"
    assert get_molecule("var:rod:2").name == "var:rod:2"
    assert get_molecule("d2").name == "d2"
    with pytest.raises(ComputeError):
        get_molecule("rand:x")
    with pytest.raises(ComputeError):
        get_molecule("nonesuch")
    m = get_molecule("rand:11")
    px = m.diameter_a / 40
    vol = density_map(m, 64, px)
    assert np.isclose(vol.sum(), m.weights.sum(), rtol=0.02)
