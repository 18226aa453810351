"""Acquisition metadata and files: EPU, SerialEM, movie headers, STAR tables, site config.

Knows nothing of Qt or of compute kernels.
"""
