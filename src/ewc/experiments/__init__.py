"""Experiments: a sequential trainer on task streams, metrics, results files and plots.

Not imported by ``import ewc``: the core library needs none of it. The ``ewc`` command
(:mod:`ewc.cli`) is the front end.
"""
