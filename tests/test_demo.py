"""The demo: generator determinism, checker correctness on ground truth, and the shipped pipeline."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from compress.demo import DEMO_DEFAULTS, demo_call_kwargs, demo_dir
from compress.demo.shapes import SHAPES, parse_caption, render, sample_scene
from compress.metrics.checker import check

_SHIPPED = (demo_dir() / "transformer").exists() and (demo_dir() / "vae").exists()
_needs_weights = pytest.mark.skipif(
    not _SHIPPED,
    reason="demo weights not exported yet (run eval/train_vae.py and eval/export_demo.py)",
)


def _checker_hits(seed: int, n: int, objects, res: int, supersample: int) -> int:
    rng = random.Random(seed)
    hits = 0
    for _ in range(n):
        scene = sample_scene(rng, objects)
        hits += check(render(scene, res, supersample), scene.caption)["all"]
    return hits


def test_generator_is_deterministic() -> None:
    a = [sample_scene(random.Random(123), (1, 3)) for _ in range(3)]
    b = [sample_scene(random.Random(123), (1, 3)) for _ in range(3)]
    assert a == b
    rng1, rng2 = random.Random(5), random.Random(5)
    for _ in range(20):
        s1, s2 = sample_scene(rng1, (1, 3)), sample_scene(rng2, (1, 3))
        assert s1 == s2
        assert np.array_equal(render(s1, 32, 4), render(s2, 32, 4))
    other = [sample_scene(random.Random(6), (1, 3)).caption for _ in range(1)]
    assert other != [sample_scene(random.Random(5), (1, 3)).caption]


def test_captions_parse_back() -> None:
    rng = random.Random(77)
    for _ in range(50):
        scene = sample_scene(rng, (1, 3))
        parsed = parse_caption(scene.caption)
        assert [p["color"] for p in parsed] == [o.color for o in scene.objects]
        assert [p["position"] for p in parsed] == [o.position for o in scene.objects]


@pytest.mark.parametrize(
    ("res", "supersample", "n"),
    [(32, 4, 300), (32, 8, 150), (256, 1, 100)],
    ids=["32px-aa4", "32px-aa8", "256px"],
)
def test_checker_on_ground_truth(res: int, supersample: int, n: int) -> None:
    # the checker is the demo's accuracy metric, so it must accept the generator's own images
    hits = _checker_hits(1000 + res, n, 1, res, supersample)
    hits += _checker_hits(2000 + res, n, (1, 3), res, supersample)
    assert hits >= 0.98 * 2 * n, f"checker accepted {hits}/{2 * n} ground-truth images"


def test_checker_rejects_wrong_caption() -> None:
    scene = sample_scene(random.Random(3), 1)
    obj = scene.objects[0]
    other_color = "red" if obj.color != "red" else "blue"
    wrong = scene.caption.replace(f" {obj.color} ", f" {other_color} ")
    verdict = check(render(scene, 32, 4), wrong)
    assert not verdict["color"] and not verdict["all"]


def test_demo_defaults_map_to_pipeline_kwargs() -> None:
    kw = demo_call_kwargs(guidance_scale=1.0)
    assert kw["num_inference_steps"] == DEMO_DEFAULTS["steps"]
    assert kw["height"] == kw["width"] == DEMO_DEFAULTS["resolution"] == 256
    assert kw["guidance_scale"] == 1.0


@pytest.fixture(scope="module")
def demo_pipe():
    from compress.demo import load_demo_pipeline

    torch.set_num_threads(1)
    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@_needs_weights
def test_demo_pipeline_generates(demo_pipe) -> None:
    # stock call: resolution binning on, default max_sequence_length, a batch of two prompts
    prompts = ["a large red circle in the center", "a small blue square at the top left"]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = demo_pipe(
        prompts, num_inference_steps=2, guidance_scale=4.5, generator=gens, output_type="np"
    )
    images = out.images
    assert images.shape == (2, 256, 256, 3)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert next(demo_pipe.transformer.parameters()).dtype == torch.float32


@_needs_weights
def test_demo_vae_decodes_and_encodes_the_pinned_latent(demo_pipe) -> None:
    # the latent is the 8x box-downsampled image; the VAE must invert that on fresh scenes
    rng = random.Random(4242)
    scenes = [sample_scene(rng, (1, 3)) for _ in range(4)]
    imgs = np.stack([render(s, 256, 1) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    lat = imgs.reshape(4, 32, 8, 32, 8, 3).mean(axis=(2, 4))

    def to_t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).permute(0, 3, 1, 2)

    with torch.no_grad():
        dec = demo_pipe.vae.decode(to_t(lat)).sample.clamp(-1, 1)
        mean = demo_pipe.vae.encode(to_t(imgs)).latent_dist.mean
    assert (mean - to_t(lat)).abs().max() < 0.05
    dec8 = ((dec / 2 + 0.5) * 255).round().permute(0, 2, 3, 1).numpy()
    ref8 = np.rint((imgs + 1) * 127.5)
    psnr = 10 * np.log10(255**2 / np.mean((dec8 - ref8) ** 2))
    assert psnr > 28, psnr
    for img, s in zip(dec8.astype(np.uint8), scenes, strict=True):
        assert check(img, s.caption)["all"], s.caption


@_needs_weights
def test_materialized_demo_loads_with_stock_diffusers(tmp_path) -> None:
    from diffusers import DiffusionPipeline, PixArtSigmaPipeline
    from transformers import BertModel, BertTokenizerFast

    from compress.demo import materialize_demo

    dest = materialize_demo(tmp_path / "demo")
    pipe = DiffusionPipeline.from_pretrained(dest)  # offline, no arguments
    assert isinstance(pipe, PixArtSigmaPipeline)
    assert isinstance(pipe.text_encoder, BertModel)
    assert isinstance(pipe.tokenizer, BertTokenizerFast)
    assert next(pipe.transformer.parameters()).dtype == torch.float32
    with pytest.raises(Exception, match="not empty"):
        materialize_demo(dest)


def test_checker_rejects_wrong_shape() -> None:
    # the shape verdict must discriminate: every ground-truth object with its shape word swapped
    rng = random.Random(11)
    wrong = total = 0
    for _ in range(60):
        scene = sample_scene(rng, 1)
        for res, ss in ((32, 4), (256, 1)):
            img = render(scene, res, ss)
            for other in SHAPES:
                if other == scene.objects[0].shape:
                    continue
                total += 1
                wrong += check(img, scene.caption.replace(f" {scene.objects[0].shape} ", f" {other} "))["shape"]
    assert wrong <= 0.02 * total, f"checker accepted {wrong}/{total} wrong shape words"
