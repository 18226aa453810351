"""Simulated data on disk: movies, micrographs, particle stacks and whole acquisition
sessions (EPU or SerialEM layout), each with its ground truth beside it.

The numbers come from :mod:`compute.simulate`; the acquisition metadata (EPU XML,
``EpuSession.dm``, SerialEM mdoc) from :mod:`metadata.synth`; STAR/MRC through
:mod:`metadata.star` and :mod:`metadata.images`.

Public API
----------
- :func:`app.simulation.writers.write_movie` -- frames to MRC or LZW TIFF (EER: not written)
- :func:`app.simulation.writers.write_particle_set` -- ``particles.mrcs`` + ``particles.star``
  + truth
- :func:`app.simulation.writers.write_micrograph_set` -- micrograph MRCs + ``micrographs.star``
  + truth
- :func:`app.simulation.writers.write_movie_set` -- movies + gain + defects + truth
- :func:`app.simulation.session.write_epu_session_sim` -- EPU folder with real movies
- :func:`app.simulation.session.write_serialem_session_sim` -- SerialEM folder (movie + mdoc)
"""
