"""Exceptions raised by the ``inference`` package.

One small hierarchy: callers catch :class:`InferenceError` for "this input cannot
be processed" and the subclasses when they want to tell the sender what to fix.
Every message names the series or instance concerned and says what a person can
do about it (resend, split the series, allow resampling, ...).
"""

from __future__ import annotations

__all__ = [
    "DuplicateSlicesError",
    "GantryTiltError",
    "GeometryError",
    "InferenceError",
    "MissingSlicesError",
    "MixedOrientationError",
    "ModelPackageError",
    "NoMatchingBValueError",
    "PixelDataError",
    "PredictionError",
]


class InferenceError(Exception):
    """Base class of every error the ``inference`` package raises on purpose."""


class GeometryError(InferenceError):
    """The images do not form one regular volume (or two volumes do not share a grid)."""


class MissingSlicesError(GeometryError):
    """A gap along the slice normal: one or more slices of the series were not received."""


class MixedOrientationError(GeometryError):
    """The images of one series have different Image Orientation (Patient) values."""


class GantryTiltError(GeometryError):
    """The slices are stacked along a direction that is not the slice normal (gantry tilt)."""


class DuplicateSlicesError(GeometryError):
    """Several images lie at the same position along the slice normal."""


class PixelDataError(InferenceError):
    """Pixel data that is missing, truncated, corrupt or in an encoding no installed decoder reads."""


class NoMatchingBValueError(InferenceError):
    """No diffusion b-value (or no usable trace image) matches what the pipeline needs."""


class ModelPackageError(InferenceError):
    """A model package (manifest, weights, network description) is missing or invalid."""


class PredictionError(InferenceError):
    """A model could not be run on the given input (wrong channels, shape, geometry)."""
