"""Seeded, reproducible phantom DICOM series with ground-truth labels (for demo models and tests)."""
