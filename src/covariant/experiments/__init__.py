"""Experiments: one module per claim of the paper; each ``run(out_dir, ...)`` writes JSON + PNG."""
