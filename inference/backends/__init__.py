"""Stage backends: one loaded network (or ensemble) that turns an image into
class probabilities on the same grid.

Every backend implements :class:`StagePredictor`. Inputs and outputs are plain
arrays on the grid they were given (the reference series' grid, or a crop of
it); whatever resampling, normalisation, reorientation or tiling a backend does
internally is undone before it returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class StagePredictor(ABC):
    """A loaded model for one stage; load once, predict many times."""

    #: Number of output classes, background included.
    num_classes: int
    #: SHA-256 of every weight/checkpoint file that was loaded, by file name.
    checksums: dict[str, str]

    @abstractmethod
    def predict_proba(
        self, image: np.ndarray, spacing_zyx: tuple[float, float, float], direction: np.ndarray
    ) -> np.ndarray:
        """Class probabilities for ``image``.

        Args:
            image: float32 array (channels, z, y, x) in the order the manifest declares.
            spacing_zyx: voxel spacing in mm along (z, y, x).
            direction: 3x3 matrix whose columns are the patient-space (LPS)
                directions of increasing x, y and z index.

        Returns:
            float32 array (num_classes, z, y, x) on the input grid, summing to 1.
        """

    def predict(self, image: np.ndarray, spacing_zyx: tuple[float, float, float], direction: np.ndarray) -> np.ndarray:
        """Label map (z, y, x) uint8 on the input grid: argmax of the probabilities."""
        return self.predict_with_confidence(image, spacing_zyx, direction)[0]

    def predict_with_confidence(
        self, image: np.ndarray, spacing_zyx: tuple[float, float, float], direction: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(label map, confidence): the argmax and, per voxel, the probability of the class chosen (float32)."""
        proba = self.predict_proba(image, spacing_zyx, direction)
        return self.labels_from(proba), np.max(proba, axis=0).astype(np.float32)

    def labels_from(self, proba: np.ndarray) -> np.ndarray:
        """The label map of a probability map (argmax; a backend may post-process it)."""
        return np.argmax(proba, axis=0).astype(np.uint8)
