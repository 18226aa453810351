"""Ground-truth data for tests, demos and ranker training.

- :mod:`compute.simulate.molecules` -- built-in Gaussian-atom molecules and density maps
- :mod:`compute.simulate.project` -- Fourier-slice projections at RELION orientations/origins
- :mod:`compute.simulate.particles` -- particle stacks with CTF, noise and junk, with truth
- :mod:`compute.simulate.micrograph` -- micrographs with particles at known positions
- :mod:`compute.simulate.movie` -- movies with a known drift, dose, shot noise and gain

Everything is arrays in, arrays out (no files) and seeded: the same seed gives the same data.
"""
