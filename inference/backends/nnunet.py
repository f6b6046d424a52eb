"""nnU-Net v2 results folders, run in-process by nnU-Net's own ``nnUNetPredictor``.

A stage names one results folder (``Trainer__Plans__configuration``) or several
(an ensemble: class probabilities averaged, as ``nnUNetv2_ensemble`` does), the
folds to use and the checkpoint name. Each folder gets one predictor, loaded
once; every prediction goes through nnU-Net's own preprocessing (cropping,
normalisation, resampling to the training spacing), sliding-window inference
(nnU-Net's tiles, Gaussian weighting, mirroring, fold averaging) and resampling
back, so results match ``nnUNetv2_predict`` on the same image (Dice >= 0.99 in
the tests; identical labels on the benchmark's cases).

Two steps are done by the node rather than by nnU-Net's functions, for speed
(``benchmarks/inference.py``): on the CPU the sliding window feeds several
patches per network call (nnU-Net feeds one; on CUDA nnU-Net's own loop runs),
and the export (logits resampled back to the input shape, softmax, cropping and
transpose reverted) runs in float32 torch, where nnU-Net resamples with scipy /
skimage in float64 (nnU-Net issue 2912). The default probability resampling
(linear; nearest along a separately resampled anisotropic axis) is done by
nnU-Net's own torch equivalent; other resampling functions run as configured.

Inputs and outputs are arrays on the caller's grid, axes (channel, z, y, x), the
order nnU-Net's SimpleITK reader produces. When the manifest gives an
``orientation``, the image is reoriented to it first (SimpleITK's DICOMOrient
convention: a pure permutation and flip of the axes) and the probabilities are
mapped back exactly, without interpolation.

Loading a results folder unpickles its checkpoints (nnU-Net calls ``torch.load``
with ``weights_only=False``): only install model folders you trust.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.backends import StagePredictor
from inference.device import run_with_oom_fallback
from inference.errors import ModelPackageError, PredictionError
from inference.manifest import NnUNetBackend, sha256_file

logger = logging.getLogger(__name__)

__all__ = ["NnUNetStage", "OrientationMap"]

#: modules whose functions a postprocessing.pkl may name (nnU-Net's own postprocessing)
_PP_ALLOWED_PREFIXES = ("nnunetv2.postprocessing.",)
#: other globals a postprocessing.pkl may reference (numpy scalars in the kwargs)
_PP_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}
#: on the CPU, up to this many sliding-window patches go through the network in one call ...
_CPU_MAX_BATCH = 8
#: ... and at most this many voxels (patches x patch voxels): a large patch goes alone
_CPU_BATCH_VOXELS = 2**17


@contextlib.contextmanager
def _quiet(what: str) -> Iterator[None]:
    """Capture what nnU-Net prints to stdout and log it at DEBUG instead."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        text = buffer.getvalue().strip()
        if text:
            logger.debug("nnU-Net output while %s:\n%s", what, text)


class OrientationMap:
    """The exact axis permutation and flips between an image and its reoriented copy.

    Built from the image's direction and the direction SimpleITK's
    ``DICOMOrient`` gives it for ``orientation``; arrays (…, z, y, x) are mapped
    to the reoriented grid by :meth:`forward` and back by :meth:`backward`.

    Args:
        direction: 3x3, columns are the patient (LPS) directions of increasing x, y, z index.
        orientation: a DICOMOrient code such as ``"LPS"`` or ``"RAS"``.

    Raises:
        ValueError: ``orientation`` is not a valid code.
    """

    def __init__(self, direction: np.ndarray, orientation: str) -> None:
        import SimpleITK as sitk

        direction = np.asarray(direction, dtype=np.float64)
        probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)
        probe.SetDirection(tuple(direction.ravel().tolist()))
        try:
            reoriented = sitk.DICOMOrient(probe, orientation)
        except RuntimeError as exc:
            raise ValueError(
                f"orientation {orientation!r} is not a valid DICOMOrient code (e.g. 'LPS', 'RAS')"
            ) from exc
        new_direction = np.asarray(reoriented.GetDirection(), dtype=np.float64).reshape(3, 3)
        dots = new_direction.T @ direction  # [new axis, old axis], in x, y, z index order
        #: old (x, y, z) axis feeding each new (x, y, z) axis
        self.perm_xyz = tuple(int(i) for i in np.argmax(np.abs(dots), axis=1))
        #: new (x, y, z) axes that run opposite to their old axis
        self.flip_xyz = tuple(bool(dots[a, b] < 0) for a, b in enumerate(self.perm_xyz))
        if sorted(self.perm_xyz) != [0, 1, 2]:
            raise ValueError(f"direction {direction.tolist()} cannot be reoriented to {orientation!r} by a permutation")
        self.direction = new_direction

    @property
    def identity(self) -> bool:
        return self.perm_xyz == (0, 1, 2) and not any(self.flip_xyz)

    def spacing_zyx(self, spacing_zyx: tuple[float, float, float]) -> tuple[float, float, float]:
        """Spacing (z, y, x) of the reoriented grid."""
        old_xyz = spacing_zyx[::-1]
        new_xyz = [float(old_xyz[b]) for b in self.perm_xyz]
        return (new_xyz[2], new_xyz[1], new_xyz[0])

    def forward(self, array: np.ndarray) -> np.ndarray:
        """(…, z, y, x) on the original grid -> (…, z', y', x') on the reoriented grid."""
        lead = array.ndim - 3
        # in (z, y, x) array axes, old x/y/z index axis b sits at lead + 2 - b
        axes = list(range(lead)) + [lead + 2 - self.perm_xyz[2 - k] for k in range(3)]
        out = np.transpose(array, axes)
        flips = tuple(lead + 2 - a for a in range(3) if self.flip_xyz[a])
        return np.flip(out, axis=flips) if flips else out

    def backward(self, array: np.ndarray) -> np.ndarray:
        """(…, z', y', x') on the reoriented grid -> (…, z, y, x) on the original grid."""
        lead = array.ndim - 3
        flips = tuple(lead + 2 - a for a in range(3) if self.flip_xyz[a])
        out = np.flip(array, axis=flips) if flips else array
        axes = list(range(lead)) + [lead + 2 - self.perm_xyz[2 - k] for k in range(3)]
        return np.transpose(out, np.argsort(axes))


class _PostprocessingUnpickler(pickle.Unpickler):
    """Loads nnU-Net's ``postprocessing.pkl`` but refuses globals other than its own functions."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PP_ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(_PP_ALLOWED_PREFIXES):
            obj = super().find_class(module, name)
            if callable(obj) and getattr(obj, "__module__", "").startswith(_PP_ALLOWED_PREFIXES):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not one of nnU-Net's postprocessing functions")


def _load_postprocessing(path: Path) -> tuple[list[Callable[..., np.ndarray]], list[dict[str, Any]]]:
    try:
        with open(path, "rb") as fh:
            loaded = _PostprocessingUnpickler(fh).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise ModelPackageError(
            f"{path}: cannot load nnU-Net postprocessing ({exc}); remove the file to run without postprocessing"
        ) from exc
    if (
        not isinstance(loaded, tuple | list)
        or len(loaded) != 2
        or not isinstance(loaded[0], list | tuple)
        or not isinstance(loaded[1], list | tuple)
        or len(loaded[0]) != len(loaded[1])
        or not all(callable(f) for f in loaded[0])
        or not all(isinstance(k, dict) for k in loaded[1])
    ):
        raise ModelPackageError(f"{path}: not an nnU-Net postprocessing.pkl (expected (functions, kwargs) lists)")
    return list(loaded[0]), [dict(k) for k in loaded[1]]


def _resample_probabilities(
    config: Any, logits: torch.Tensor, shape: list[int], current_spacing: list[float], new_spacing: list[float]
) -> torch.Tensor:
    """The plans' ``resampling_fn_probabilities`` applied to float32 logits (c, z, y, x), in torch where it is
    nnU-Net's default: ``resample_data_or_seg_to_shape`` with ``order=1`` (linear; along an anisotropic axis
    resampled separately, ``order_z`` 0 = nearest or 1 = linear), as nnU-Net's ``resample_torch_fornnunet``."""
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet

    name = config.configuration.get("resampling_fn_probabilities")
    kwargs = dict(config.configuration.get("resampling_fn_probabilities_kwargs") or {})
    if (
        name == "resample_data_or_seg_to_shape"
        and not kwargs.get("is_seg", False)
        and kwargs.get("order", 3) == 1
        and kwargs.get("order_z", 0) in (0, 1)
    ):
        return resample_torch_fornnunet(
            logits,
            shape,
            current_spacing,
            new_spacing,
            is_seg=False,
            num_threads=torch.get_num_threads(),
            device=torch.device("cpu"),
            force_separate_z=kwargs.get("force_separate_z", False),
            separate_z_anisotropy_threshold=kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD),
            mode="linear",
            aniso_axis_mode="nearest-exact" if kwargs.get("order_z", 0) == 0 else "linear",
        )
    out = config.resampling_fn_probabilities(logits, shape, current_spacing, new_spacing)
    if isinstance(out, torch.Tensor):
        return out.float()
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def _fold_dir(fold: int | str) -> str:
    return f"fold_{fold}"


class NnUNetStage(StagePredictor):
    """One stage backed by nnU-Net v2 results folder(s), loaded once.

    Args:
        spec: the stage's ``nnunet`` backend settings from ``model.yaml``.
        package_folder: the model package folder; ``spec.folders`` are relative to it.
        device: where to run (``inference.device.choose_device``). On CUDA a
            prediction that runs out of GPU memory is rerun on the CPU.
        num_threads: torch CPU threads during a prediction (restored afterwards);
            None keeps the process setting.

    Raises:
        ModelPackageError: a folder, ``plans.json``, ``dataset.json`` or a fold's
            checkpoint is missing, nnU-Net cannot load the model, the ensemble's
            members disagree on labels or channels, or the model is of a kind this
            backend does not run (region-based, cascade), or a file the manifest's
            ``sha256`` lists is missing or has another digest, or a checkpoint it loads
            is not listed there (when ``sha256`` is given; checked before anything is unpickled).
    """

    def __init__(
        self,
        spec: NnUNetBackend,
        package_folder: Path,
        *,
        device: torch.device,
        num_threads: int | None = None,
    ) -> None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        self.spec = spec
        self.package_folder = Path(package_folder)
        self.device = torch.device(device)
        self.num_threads = num_threads
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer, not {num_threads}")
        if not spec.folders or not spec.folds:
            raise ModelPackageError(
                f"nnunet stage: folders {list(spec.folders)} and folds {list(spec.folds)} must each name at least one"
            )
        if spec.orientation is not None:
            try:
                OrientationMap(np.eye(3), spec.orientation)
            except ValueError as exc:
                raise ModelPackageError(f"orientation: {exc}") from exc
        self.folders = [self.package_folder / f for f in spec.folders]
        self.checksums = {}
        verified = self._verify_checksums()
        self._predictors: list[Any] = []
        labels: list[int] | None = None
        channels: int | None = None
        for folder in self.folders:
            checkpoints = self._check_folder(folder)
            unlisted = [self._key(p) for p in checkpoints if self._key(p) not in verified]
            if self.spec.sha256 and unlisted:
                raise ModelPackageError(
                    f"sha256 in model.yaml has no digest for {unlisted}: when sha256 is given, every checkpoint "
                    "the stage loads must be listed; add them, or import the model again"
                )
            predictor = self._make_predictor(nnUNetPredictor)
            try:
                with _quiet(f"loading {folder}"):
                    predictor.initialize_from_trained_model_folder(
                        str(folder), use_folds=tuple(spec.folds), checkpoint_name=spec.checkpoint
                    )
            except Exception as exc:  # nnU-Net raises bare KeyError/RuntimeError/... for broken folders
                raise ModelPackageError(f"the model folder {folder}: nnU-Net could not load it: {exc!r}") from exc
            label_manager = predictor.label_manager
            if label_manager.has_regions:
                raise ModelPackageError(
                    f"the model folder {folder} is region-based (dataset.json regions_class_order); "
                    "its outputs are not class probabilities and this backend does not run it"
                )
            if predictor.configuration_manager.previous_stage_name is not None:
                raise ModelPackageError(
                    f"the model folder {folder} is an nnU-Net cascade stage (needs the "
                    f"{predictor.configuration_manager.previous_stage_name} prediction); use a "
                    "3d_fullres or 3d_lowres folder, or a two-stage manifest"
                )
            n_in = int(
                determine_num_input_channels(
                    predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
                )
            )
            member_labels = [int(v) for v in label_manager.all_labels]
            if labels is None:
                labels, channels = member_labels, n_in
            elif member_labels != labels or n_in != channels:
                raise ModelPackageError(
                    f"the ensemble's folders disagree: {self.folders[0]} has labels {labels} and {channels} input "
                    f"channel(s), {folder} has labels {member_labels} and {n_in}; an ensemble needs the same dataset"
                )
            for path in [folder / "plans.json", folder / "dataset.json", *checkpoints]:
                self.checksums[self._key(path)] = verified.get(self._key(path)) or sha256_file(path)
            self._predictors.append(predictor)
        assert labels is not None and channels is not None  # set by the first folder (checked above)
        self.labels = labels
        self.num_classes = int(self._predictors[0].label_manager.num_segmentation_heads)
        self.num_input_channels = channels
        self._postprocessing = self._find_postprocessing(self.folders[0])
        logger.info(
            "loaded nnU-Net stage %s (folds %s, %s) on %s: %d classes, %d input channel(s)%s",
            ", ".join(spec.folders),
            list(spec.folds),
            spec.checkpoint,
            self.device,
            self.num_classes,
            self.num_input_channels,
            ", with postprocessing" if self._postprocessing else "",
        )

    # -- loading -------------------------------------------------------------------------------

    def _make_predictor(self, cls: Any) -> Any:
        with _quiet("creating the predictor"):  # nnU-Net prints a notice for every CPU predictor
            return cls(
                tile_step_size=self.spec.tile_step_size,
                use_gaussian=True,
                use_mirroring=self.spec.use_mirroring,
                perform_everything_on_device=self.device.type == "cuda",
                device=self.device,
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )

    def _verify_checksums(self) -> dict[str, str]:
        """Check every file ``sha256`` lists against its recorded digest, before anything is unpickled.

        Returns:
            The verified digests by path relative to the package folder.

        Raises:
            ModelPackageError: a listed file is outside the package, missing, or has another digest.
        """
        root = self.package_folder.resolve()
        verified: dict[str, str] = {}
        for relative, expected in self.spec.sha256.items():
            path = (root / relative).resolve()
            if root not in path.parents:
                raise ModelPackageError(f"sha256: {relative!r} points outside the model package {root}")
            if not path.is_file():
                raise ModelPackageError(
                    f"sha256: {relative!r} is not in the model package {root}; copy the whole package again"
                )
            actual = sha256_file(path)
            if actual != expected:
                raise ModelPackageError(
                    f"{path}: SHA-256 mismatch: the file has {actual}, model.yaml records {expected}; it changed "
                    "since the package was made (a damaged or different file): copy it again from its source, "
                    "or import the model again"
                )
            verified[self._key(path)] = actual
        if verified:
            logger.info("nnU-Net stage %s: %d file(s) match their SHA-256", ", ".join(self.spec.folders), len(verified))
        return verified

    def _key(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.package_folder.resolve()).as_posix()
        except ValueError:
            return str(path)

    def _check_folder(self, folder: Path) -> list[Path]:
        """The checkpoint files the stage will load from ``folder``; ModelPackageError naming what is missing."""
        if not folder.is_dir():
            raise ModelPackageError(
                f"the model folder {folder} does not exist; copy the nnU-Net results folder "
                "(Trainer__Plans__configuration) into the model package"
            )
        for name in ("plans.json", "dataset.json"):
            if not (folder / name).is_file():
                raise ModelPackageError(
                    f"the model folder {folder} lacks {name}; copy the whole nnU-Net results folder "
                    "(Trainer__Plans__configuration, with plans.json and dataset.json beside the fold_* folders)"
                )
        checkpoint = self.spec.checkpoint
        present = sorted(
            (p.name.removeprefix("fold_") for p in folder.glob("fold_*") if (p / checkpoint).is_file()),
            key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f),
        )
        present_folds: list[int | str] = [int(f) if f.isdigit() else f for f in present]
        paths = []
        for fold in self.spec.folds:
            path = folder / _fold_dir(fold) / checkpoint
            if path.is_file():
                paths.append(path)
                continue
            others = sorted(p.name for p in (folder / _fold_dir(fold)).glob("*.pth")) if path.parent.is_dir() else []
            if present_folds:
                hint = f"set folds in model.yaml to the folds present: {present_folds}"
            elif others:
                hint = f"set checkpoint in model.yaml to one present in {_fold_dir(fold)}: {others}"
            else:
                hint = f"no fold_*/{checkpoint} exists there; copy the trained folds into the package"
            if present_folds and others:
                hint += f", or set checkpoint to one present in {_fold_dir(fold)}: {others}"
            raise ModelPackageError(f"the model folder {folder} lacks {_fold_dir(fold)}/{checkpoint}; {hint}")
        return paths

    def _find_postprocessing(self, folder: Path) -> tuple[list[Callable[..., np.ndarray]], list[dict[str, Any]]] | None:
        """nnU-Net's postprocessing.pkl: in the folder itself, or in its crossval_results_folds_* folder."""
        folds = "_".join(str(f) for f in self.spec.folds)
        for path in (folder / "postprocessing.pkl", folder / f"crossval_results_folds_{folds}" / "postprocessing.pkl"):
            if path.is_file():
                pp = _load_postprocessing(path)
                self.checksums[self._key(path)] = sha256_file(path)
                logger.info(
                    "nnU-Net postprocessing from %s: %s",
                    path,
                    [f"{getattr(f, '__name__', f)}({k})" for f, k in zip(*pp, strict=True)],
                )
                return pp
        return None

    # -- prediction ----------------------------------------------------------------------------

    def _validate(
        self, image: np.ndarray, spacing_zyx: tuple[float, float, float], direction: np.ndarray
    ) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
        image = np.asarray(image)
        if image.ndim != 4:
            raise PredictionError(f"image: expected (channels, z, y, x), got an array of shape {image.shape}")
        if image.shape[0] != self.num_input_channels:
            raise PredictionError(
                f"image: the model takes {self.num_input_channels} input channel(s), the image has {image.shape[0]}"
            )
        if min(image.shape[1:]) < 1:
            raise PredictionError(f"image: empty volume of shape {image.shape}")
        spacing = tuple(float(s) for s in spacing_zyx)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise PredictionError(f"spacing_zyx: expected three positive spacings in mm, got {spacing_zyx}")
        d = np.asarray(direction, dtype=np.float64)
        if d.shape != (3, 3) or not np.all(np.isfinite(d)) or not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
            raise PredictionError(
                f"direction: expected an orthonormal 3x3 matrix, got {np.asarray(direction).tolist()}"
            )
        if not np.all(np.isfinite(image)):
            raise PredictionError("image: contains NaN or infinite values")
        return np.ascontiguousarray(image, dtype=np.float32), (spacing[0], spacing[1], spacing[2]), d

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        if self.num_threads is None:
            yield
            return
        old = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def _run(self, image: np.ndarray, spacing_zyx: tuple[float, float, float], device: torch.device) -> np.ndarray:
        """Average of the ensemble members' probabilities, on ``device`` (the stage's, or the CPU fallback)."""
        total: np.ndarray | None = None
        for folder, predictor in zip(self.folders, self._predictors, strict=True):
            with torch.inference_mode(), _quiet(f"predicting with {folder}"):
                proba = self._member_proba(predictor, image, spacing_zyx, device)
            if total is None:
                total = proba
            else:
                total += proba
        assert total is not None
        if len(self._predictors) > 1:
            total /= len(self._predictors)
        return total

    def _member_proba(
        self, predictor: Any, image: np.ndarray, spacing_zyx: tuple[float, float, float], device: torch.device
    ) -> np.ndarray:
        """One results folder's probabilities (num_classes, z, y, x), float32, on the input grid.

        The steps of nnU-Net's ``predict_single_npy_array``: nnU-Net's own preprocessing (crop to
        nonzero, normalisation, resampling to the target spacing); its sliding window, batched on the
        CPU (:meth:`_logits_cpu`); then its export (resampling back, softmax, cropping reverted,
        transpose reverted) done in torch (:meth:`_export`) instead of with scipy in float64.
        """
        plans, config = predictor.plans_manager, predictor.configuration_manager
        t0 = time.perf_counter()
        data, _, props = config.preprocessor_class(verbose=False).run_case_npy(
            image, None, {"spacing": list(spacing_zyx)}, plans, config, predictor.dataset_json
        )
        data = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        t_pre = time.perf_counter()
        if device.type == "cpu":
            logits = self._logits_cpu(predictor, data)
        else:
            saved = predictor.device, predictor.perform_everything_on_device
            if device != predictor.device:
                # nnU-Net moves the network to predictor.device at every call
                predictor.device, predictor.perform_everything_on_device = device, False
            try:
                logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
            finally:
                predictor.device, predictor.perform_everything_on_device = saved
        del data
        logger.debug(
            "nnU-Net member: preprocessing %.2f s, network %.2f s, on a grid of %s",
            t_pre - t0,
            time.perf_counter() - t_pre,
            tuple(logits.shape[1:]),
        )
        owned = [logits]  # _export takes it over, so that it is freed as soon as it is resampled
        del logits
        return self._export(predictor, owned, props)

    @staticmethod
    def _logits_cpu(predictor: Any, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's sliding window (``predict_logits_from_preprocessed_data``) on the CPU, several
        patches per network call.

        Same tiles (nnU-Net's own slicers on nnU-Net's padding), Gaussian weights, mirroring and
        fold averaging as nnU-Net; logits accumulated in float32 (nnU-Net: float16). nnU-Net feeds one
        patch at a time; on a CPU a small network spends most of such a call in per-call overhead,
        so up to ``_CPU_MAX_BATCH`` patches (at most ``_CPU_BATCH_VOXELS`` voxels) go in together.
        """
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        cpu = torch.device("cpu")
        network = predictor.network.to(cpu)  # nnU-Net moves it to the predictor's device at every call
        network.eval()
        patch = tuple(int(p) for p in predictor.configuration_manager.patch_size)
        padded, revert_padding = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
        slicers = predictor._internal_get_sliding_window_slicers(padded.shape[1:])
        gaussian = (
            compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32, device=cpu)
            if predictor.use_gaussian
            else None
        )
        weights = torch.zeros(padded.shape[1:], dtype=torch.float32)
        for sl in slicers:
            weights[sl[1:]] += 1.0 if gaussian is None else gaussian
        batch = max(1, min(_CPU_MAX_BATCH, _CPU_BATCH_VOXELS // max(1, int(np.prod(patch)))))
        n_classes = int(predictor.label_manager.num_segmentation_heads)
        folds = predictor.list_of_parameters
        total: torch.Tensor | None = None
        for params in folds:
            if len(folds) > 1:
                getattr(network, "_orig_mod", network).load_state_dict(params)
            logits = torch.zeros((n_classes, *padded.shape[1:]), dtype=torch.float32)
            for start in range(0, len(slicers), batch):
                chunk = slicers[start : start + batch]
                pred = predictor._internal_maybe_mirror_and_predict(torch.stack([padded[sl] for sl in chunk]))
                if gaussian is not None:
                    pred *= gaussian
                for sl, p in zip(chunk, pred, strict=True):
                    logits[sl] += p
            logits /= weights
            if not torch.isfinite(logits).all():
                raise RuntimeError("the network produced non-finite logits")
            if total is None:
                total = logits
            else:
                total += logits
        assert total is not None
        if len(folds) > 1:
            total /= len(folds)
        return total[(slice(None), *revert_padding[1:])]

    @staticmethod
    def _export(predictor: Any, owned_logits: list[torch.Tensor], props: dict[str, Any]) -> np.ndarray:
        """nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape`` (probabilities), in torch.

        Logits on the preprocessed grid -> resampled to the cropped input shape -> softmax -> cropping
        reverted (background 1 outside the box) -> transpose reverted. nnU-Net's default probability
        resampling (skimage order 1, nearest along a separate anisotropic axis, in float64) is done by
        nnU-Net's own torch equivalent ``resample_torch_fornnunet`` in float32; any other resampling
        function the plans name is called as nnU-Net would. ``owned_logits`` holds the logits, which
        are taken out of it.
        """
        t0 = time.perf_counter()
        plans, config, labels = predictor.plans_manager, predictor.configuration_manager, predictor.label_manager
        shape = [int(v) for v in props["shape_after_cropping_and_before_resampling"]]
        spacing_t = [float(props["spacing"][i]) for i in plans.transpose_forward]
        current = list(config.spacing) if len(config.spacing) == len(shape) else [spacing_t[0], *config.spacing]
        logits = owned_logits.pop().float()
        if list(logits.shape[1:]) != shape:
            logits = _resample_probabilities(config, logits, shape, current, spacing_t)
        probs = labels.apply_inference_nonlin(logits)
        del logits
        if [int(v) for v in props["shape_before_cropping"]] != shape:
            probs = labels.revert_cropping_on_probabilities(
                probs, props["bbox_used_for_cropping"], props["shape_before_cropping"]
            )
        out = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, dtype=np.float32)
        logger.debug("nnU-Net member: export to %s in %.2f s", tuple(out.shape[1:]), time.perf_counter() - t0)
        return out.transpose([0, *[i + 1 for i in plans.transpose_backward]])

    def predict_proba(
        self, image: np.ndarray, spacing_zyx: tuple[float, float, float], direction: np.ndarray
    ) -> np.ndarray:
        """Class probabilities (num_classes, z, y, x), float32, on the input grid.

        Raises:
            PredictionError: the image, spacing or direction is not what the model takes,
                or nnU-Net failed on it.
        """
        image, spacing, d = self._validate(image, spacing_zyx, direction)
        orient = OrientationMap(d, self.spec.orientation) if self.spec.orientation else None
        if orient is not None and not orient.identity:
            image = np.ascontiguousarray(orient.forward(image))
            spacing = orient.spacing_zyx(spacing)
        what = f"nnU-Net stage {', '.join(self.spec.folders)} on an image of shape {tuple(image.shape)}"
        try:
            with self._threads():
                proba = run_with_oom_fallback(lambda dev: self._run(image, spacing, dev), self.device, what=what)
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:
            raise PredictionError(f"{what}: nnU-Net failed: {exc!r}") from exc
        if proba.shape != (self.num_classes, *image.shape[1:]):
            raise PredictionError(f"{what}: nnU-Net returned probabilities of shape {proba.shape}")
        if orient is not None and not orient.identity:
            proba = orient.backward(proba)
        return np.ascontiguousarray(proba, dtype=np.float32)

    def labels_from(self, proba: np.ndarray) -> np.ndarray:
        """Argmax of the averaged probabilities, then the folder's ``postprocessing.pkl`` when it has
        one (applied as ``nnUNetv2_apply_postprocessing`` does)."""
        seg = np.argmax(proba, axis=0).astype(np.uint8 if self.num_classes <= 256 else np.uint16)
        if self._postprocessing is not None:
            from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing

            fns, kwargs = self._postprocessing
            seg = np.asarray(apply_postprocessing(seg, fns, kwargs)).astype(seg.dtype, copy=False)
        return seg
