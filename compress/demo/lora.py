"""The demo's "red" LoRA (eval/train_demo_lora.py) and a measure of its effect.

The LoRA makes the demo transformer draw every object red whatever colour word the caption says;
shape, size and position still follow the caption.
"""

from __future__ import annotations

from pathlib import Path

from compress.demo.shapes import Obj, parse_caption
from compress.metrics.checker import check

RED_LORA = Path(__file__).parent / "adapters" / "red.safetensors"


def _red_caption(objects: list[dict[str, str]]) -> str:
    # the caption's objects with their colour set to red; the coordinates play no part in a phrase
    return " and ".join(
        Obj(
            color="red", shape=o["shape"], size=o["size"], position=o["position"], cx=0.0, cy=0.0
        ).phrase()
        for o in objects
    )


def lora_effect(images, captions) -> float:
    """Fraction of images the checker reads as red, over the captions not already all red.

    Each image is checked for colour against its caption with every colour word replaced by
    "red". Captions whose objects are all red are skipped, so the base model scores near 0 and a
    perfect red LoRA 1.0.

    Args:
        images: PIL images or HxWx3 arrays, one per caption.
        captions: demo-grammar captions.

    Returns:
        The fraction, in [0, 1].
    """
    hits = n = 0
    for image, caption in zip(images, captions, strict=True):
        objects = parse_caption(caption)
        if all(o["color"] == "red" for o in objects):
            continue
        hits += bool(check(image, _red_caption(objects))["color"])
        n += 1
    if n == 0:
        raise ValueError("lora_effect needs at least one caption with a colour other than red")
    return hits / n
