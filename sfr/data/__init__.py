"""Data layer: annotations, LMDB feature stores, time grids, datasets and synthetic data."""
