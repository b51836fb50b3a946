"""Shared test fixtures: offline mode and tiny saved pipelines of every family."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

# Before any hub-aware import: tests must never reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# W8A8 layers pick int8 or dequantised weights by timing at their first call; tests pin the
# int8 path so numerics do not depend on the machine's load (test_w8a8_dense covers the choice)
os.environ.setdefault("DIT_COMPRESS_W8A8_DENSE", "never")
os.environ.setdefault("DIT_COMPRESS_MOE_DENSE", "never")  # likewise the MoE form (moe_dense)

import pytest
import torch

# Tests share the CPU with long background jobs; one thread keeps them from fighting.
torch.set_num_threads(1)

# Lets tests import `tiny_pipelines` whatever pytest's import mode is, and `compress` from a
# checkout that is not pip-installed.
sys.path.insert(0, str(Path(__file__).parent))
if str(Path(__file__).parent.parent) not in sys.path:
    sys.path.insert(1, str(Path(__file__).parent.parent))

from tiny_pipelines import FAMILIES, build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: ``tiny_pipeline_dir(family)`` -> directory of that family's saved tiny pipeline.

    Each family is built and saved once per session (seed 0); treat the directory as read-only.
    """
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        if family not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{family}")
            build_tiny_pipeline(family, seed=0).save_pretrained(out)
            cache[family] = out
        return cache[family]

    return get
