"""Numerical kernels on NumPy/CuPy arrays.

Nothing here reads or writes files, knows STAR/MRC, or imports Qt. Only
:mod:`compute.backend` knows that CuPy exists.
"""
