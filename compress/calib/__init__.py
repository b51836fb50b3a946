"""Calibration data: prompt files, capture of transformer inputs, and the on-disk set."""

from compress.calib.capture import (
    SEED_BASE,
    calibration_hash,
    capture,
    capture_generic,
    default_cache_root,
    state_hash,
)
from compress.calib.dataset import (
    CalibrationSet,
    CalibrationWriter,
    CalibSample,
    find_block,
    inputs_to_block,
    is_complete,
)
from compress.calib.prompts import load_prompts

__all__ = [
    "SEED_BASE",
    "CalibSample",
    "CalibrationSet",
    "CalibrationWriter",
    "calibration_hash",
    "capture",
    "capture_generic",
    "default_cache_root",
    "find_block",
    "inputs_to_block",
    "is_complete",
    "load_prompts",
    "state_hash",
]
