"""VDAM (RELION 4's gradient optimiser) and EM for 2D classification and the 3D initial model.

- :mod:`compute.vdam.optimiser`: generic (2D/3D) VDAM and EM updates, noise/class bookkeeping,
  inactive-class replacement; works on Fourier-space references and per-shell indices.
- :mod:`compute.vdam.schedule`: step size / batch size / tau-fudge schedules and the seeded
  mini-batch sampler.
- :mod:`compute.vdam.init`: Gaussian-blob initial references (2D or 3D).
- :mod:`compute.vdam.estep2d`: the 2D E-step (in-plane rotations x translations x classes).
- :mod:`compute.vdam.classify2d`: the 2D classification driver used by the class2d job.
"""
