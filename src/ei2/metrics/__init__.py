"""Metrics of an edit and of the model: covariate-shift analysis (`ei2.metrics.shift`, seed A.2–A.5).

Import the submodules directly; this package imports nothing heavy on its own.
"""
