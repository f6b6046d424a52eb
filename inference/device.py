"""Where models run: device choice, autocast, and the fallback to CPU when the
GPU runs out of memory.

A worker picks its device once (:func:`choose_device`), loads its models there,
and runs each prediction through :func:`run_with_oom_fallback`, so that a volume
too large for the GPU is still segmented, on the CPU, with a warning in the log
instead of a failed job.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

CPU = torch.device("cpu")


def choose_device(allow_gpu: bool = True, prefer: str = "auto") -> torch.device:
    """The device models should run on.

    Args:
        allow_gpu: False forces the CPU (a pipeline whose manifest says ``gpu: false``,
            or a node configured without GPU).
        prefer: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            A CUDA device asked for but not available gives the CPU, with a warning.

    Returns:
        ``cuda`` (or ``cuda:N``) when a GPU is available and allowed, else ``cpu``.

    Raises:
        ValueError: ``prefer`` is not one of the values above.
    """
    choice = str(prefer).strip().lower()
    if choice not in ("auto", "cpu", "cuda") and not (choice.startswith("cuda:") and choice[5:].isdigit()):
        raise ValueError(f"device preference {prefer!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not allow_gpu or choice == "cpu":
        logger.info("running models on the CPU (%s)", "GPU not allowed" if not allow_gpu else "CPU requested")
        return CPU
    if not torch.cuda.is_available():
        if choice == "auto":
            logger.info("running models on the CPU (no CUDA device available)")
        else:
            logger.warning("device %r requested but CUDA is not available; running models on the CPU", prefer)
        return CPU
    device = torch.device("cuda" if choice == "auto" else choice)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        logger.warning(
            "device %r requested but only %d CUDA device(s) exist; running models on the CPU",
            prefer,
            torch.cuda.device_count(),
        )
        return CPU
    logger.info("running models on %s (%s)", device, torch.cuda.get_device_name(index))
    return device


def autocast_context(device: torch.device) -> AbstractContextManager[object]:
    """Mixed precision on CUDA (``torch.autocast``); a no-op context on the CPU.

    Autocast on the CPU (bfloat16) is slow on many processors and changes
    results, so it is never enabled there.
    """
    if device.type == "cuda":
        return torch.autocast(device_type="cuda")
    return contextlib.nullcontext()


def empty_device_cache(device: torch.device) -> None:
    """Release cached GPU memory (after collecting garbage); nothing on the CPU."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_oom_fallback(
    fn: Callable[[torch.device], T],
    device: torch.device,
    *,
    what: str = "inference",
    on_fallback: Callable[[torch.device], None] | None = None,
) -> T:
    """Run ``fn(device)``; when the GPU runs out of memory, run ``fn(cpu)`` instead.

    Args:
        fn: the work, given the device to run on.
        device: the preferred device. On the CPU, ``fn`` runs once and any error propagates.
        what: what is running, for the log line ("stage kidneys of job 12").
        on_fallback: called with the CPU device after the GPU failed and its cache
            was emptied, before ``fn`` is rerun (e.g. to move weights to the CPU).

    Returns:
        What ``fn`` returned.

    Raises:
        Whatever ``fn`` raises, except a CUDA out-of-memory error on a CUDA device.
    """
    if device.type != "cuda":
        return fn(device)
    try:
        return fn(device)
    except torch.cuda.OutOfMemoryError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # outside the except block, so the traceback (and the GPU tensors its frames hold) is gone
    logger.warning("GPU out of memory running %s; falling back to CPU (%s)", what, detail)
    empty_device_cache(device)
    if on_fallback is not None:
        on_fallback(CPU)
    return fn(CPU)
