"""Experiments: one module per claim of the paper; each ``run(out_dir, ...)`` writes JSON + PNG
and resumes after a kill (finished parts are kept as they complete).

- :mod:`covariant.experiments.demo`: ``covariant demo``, naive vs invariant flatness;
- :mod:`covariant.experiments.optimization`: ``covariant reproduce optimization``;
- :mod:`covariant.experiments.density`: ``covariant reproduce density``.

Example
-------
>>> from covariant.experiments import demo, density, optimization
>>> all(callable(m.run) for m in (demo, density, optimization))
True
"""
