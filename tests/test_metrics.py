"""Numerics of the image metrics, Fréchet distance, timing helpers and the evaluation driver."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg, ndimage
from torch import nn

from compress.demo.shapes import render, sample_scene
from compress.errors import UserError
from compress.metrics import checker
from compress.metrics.evaluate import quality, sample_images, teacher_images, to_8bit_grid
from compress.metrics.frechet import frechet_distance, frechet_from_features, image_features
from compress.metrics.image import PSNR_CAP, psnr, psnr_per_image, ssim
from compress.metrics.timing import latency_ms_per_step, peak_rss_mb
from compress.models.base import FamilyAdapter, ModelHandle

torch.set_num_threads(1)

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: only keeps BLAS from fighting other jobs for the cores
    threadpool_limits = None


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # Multi-threaded OpenBLAS on small matrices slows down 100x when the cores are busy.
    if threadpool_limits is None:
        yield
        return
    with threadpool_limits(1):
        yield


def _scenes(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = random.Random(seed)
    scenes = [sample_scene(rng, (1, 3)) for _ in range(n)]
    images = np.stack([render(s) for s in scenes]).astype(np.float32) / 255.0
    return images, [s.caption for s in scenes]


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(images, sigma=(0, sigma, sigma, 0))


# ---------------------------------------------------------------- PSNR


def test_psnr_matches_formula_for_gaussian_noise():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.2, 0.8, size=(8, 64, 64, 3))
    sigma = 0.05  # 4.3 sigma below the value range: clipping never happens
    b = a + rng.normal(0.0, sigma, size=a.shape)
    expected = 10 * math.log10(1.0 / sigma**2)  # 26.02 dB
    assert abs(psnr(a, b) - expected) < 0.1


def test_psnr_exact_for_constant_offset():
    a = np.full((2, 16, 16, 3), 0.3)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-9)
    assert psnr(a, a + 0.01) == pytest.approx(40.0, abs=1e-9)


def test_psnr_identical_is_inf_and_partial_identity_is_capped():
    a = np.random.default_rng(1).uniform(size=(3, 8, 8, 3))
    assert psnr(a, a) == math.inf
    b = a.copy()
    b[0] += 0.1
    per = psnr_per_image(a, b)
    assert per[1] == math.inf and per[0] == pytest.approx(20.0)
    assert psnr(a, b) == pytest.approx((20.0 + 2 * PSNR_CAP) / 3)


def test_psnr_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 9, 3)))


# ---------------------------------------------------------------- SSIM


def test_ssim_identical_is_one_and_noise_is_low():
    images, _ = _scenes(4)
    assert ssim(images, images) == pytest.approx(1.0, abs=1e-9)
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 0.05, images.shape), 0, 1)
    assert ssim(images, noisy) < 0.9


def test_ssim_constant_images_follow_luminance_term():
    # flat images have zero variance, so SSIM reduces to (2xy + C1) / (x^2 + y^2 + C1)
    x, y, c1 = 0.5, 0.6, 0.01**2
    expected = (2 * x * y + c1) / (x * x + y * y + c1)
    got = ssim(np.full((1, 16, 16, 3), x), np.full((1, 16, 16, 3), y))
    assert got == pytest.approx(expected, abs=1e-12)


def test_ssim_monotonic_in_noise_symmetric_and_works_on_tiny_images():
    rng = np.random.default_rng(2)
    a = rng.uniform(0.3, 0.7, size=(2, 6, 6, 3))  # smaller than the 11 px window
    noisy = [a + rng.normal(0, s, a.shape) for s in (0.01, 0.05, 0.2)]
    scores = [ssim(a, b) for b in noisy]
    assert scores[0] > scores[1] > scores[2]
    assert ssim(a, noisy[1]) == pytest.approx(ssim(noisy[1], a), abs=1e-12)


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_same_set_is_zero_and_damage_is_clearly_larger():
    images, _ = _scenes(32)
    assert frechet_distance(images, images) < 1e-9
    assert frechet_distance(images, _blur(images, 1.0)) > 1e-4


def test_frechet_monotonic_in_blur_colour_shift_and_noise():
    images, _ = _scenes(32)
    blur = [frechet_distance(images, _blur(images, s)) for s in (0.5, 1.0, 2.0)]
    assert blur[0] < blur[1] < blur[2]
    shift = np.array([1.0, -1.0, 0.0])
    colour = [
        frechet_distance(images, np.clip(images + d * shift, 0, 1)) for d in (0.02, 0.05, 0.15)
    ]
    assert colour[0] < colour[1] < colour[2]
    rng = np.random.default_rng(0)
    noise = [
        frechet_distance(images, np.clip(images + rng.normal(0, s, images.shape), 0, 1))
        for s in (0.01, 0.03, 0.1)
    ]
    assert noise[0] < noise[1] < noise[2]


def test_frechet_low_rank_path_matches_full_formula():
    rng = np.random.default_rng(3)
    fa = rng.normal(size=(20, 50))
    fb = rng.normal(size=(24, 50)) * 1.5 + 0.2
    eps = 1e-6
    s_a, s_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    ridge = eps * (np.trace(s_a) + np.trace(s_b)) / (2 * 50)
    s_a, s_b = s_a + ridge * np.eye(50), s_b + ridge * np.eye(50)
    cross = np.real(linalg.sqrtm(s_a @ s_b))
    mu = fa.mean(0) - fb.mean(0)
    full = mu @ mu + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross)
    assert frechet_from_features(fa, fb, eps) == pytest.approx(full, rel=1e-6)


def test_frechet_features_are_fixed_and_small_sets_work():
    images, _ = _scenes(3)
    f1, f2 = image_features(images), image_features(images.copy())
    assert f1.shape == (3, 226) and np.array_equal(f1, f2)
    one = frechet_distance(images[:1], _blur(images[:1], 1.0))
    assert math.isfinite(one) and one > 0


# ---------------------------------------------------------------- timing


def test_latency_is_median_and_counts_warmup():
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.002)

    ms = latency_ms_per_step(step, repeats=3, warmup=2)
    assert len(calls) == 5
    assert 2.0 <= ms < 200.0


def test_peak_rss_is_plausible():
    assert 10.0 < peak_rss_mb() < 1e6


# ---------------------------------------------------------------- evaluation driver


def _fake_handle(source_hash: str | None = "src-123") -> tuple[ModelHandle, list[int]]:
    calls: list[int] = []

    def generate(pipe, prompts, seeds, steps, guidance, resolution):
        calls.append(len(prompts))
        # the scene depends only on the seed, like a seeded sampler
        return np.stack([render(sample_scene(random.Random(s), 1)) for s in seeds]) / 255.0

    adapter = FamilyAdapter(
        name="fake",
        transformer_classes=(),
        block_lists=(),
        role_of=lambda n, m: None,
        generate=generate,
    )
    handle = ModelHandle(
        transformer=nn.Identity(), adapter=adapter, pipeline=object(), source_hash=source_hash
    )
    return handle, calls


def _seeded_prompts(seeds: list[int]) -> list[str]:
    return [sample_scene(random.Random(s), 1).caption for s in seeds]


def test_sample_images_batches_and_validates():
    handle, calls = _fake_handle()
    seeds = [1, 2, 3, 4, 5]
    out = sample_images(handle, _seeded_prompts(seeds), seeds, 4, 2.0, 32, batch_size=2)
    assert out.shape == (5, 32, 32, 3) and out.dtype == np.float32
    assert calls == [2, 2, 1]
    with pytest.raises(ValueError, match="seeds"):
        sample_images(handle, ["a"], [1, 2], 4, 2.0, 32)
    bare = ModelHandle(transformer=nn.Identity(), adapter=handle.adapter)
    with pytest.raises(UserError, match="pipeline"):
        sample_images(bare, ["a"], [1], 4, 2.0, 32)


def test_teacher_images_cached_by_inputs(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "root"))
    handle, calls = _fake_handle()
    seeds = [7, 8, 9]
    prompts = _seeded_prompts(seeds)
    first = teacher_images(handle, prompts, seeds, 4, 2.0, 32)
    files = list((tmp_path / "root" / "teacher").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp file left behind
    n_calls = len(calls)
    again = teacher_images(handle, prompts, seeds, 4, 2.0, 32)
    assert len(calls) == n_calls and np.array_equal(first, again)
    assert np.array_equal(first, to_8bit_grid(first))
    teacher_images(handle, prompts, seeds, 5, 2.0, 32)  # other steps: a new entry
    assert len(calls) > n_calls
    assert len(list((tmp_path / "root" / "teacher").iterdir())) == 2


def test_teacher_cache_dir_override_and_corrupt_entry(tmp_path: Path):
    handle, calls = _fake_handle()
    seeds = [1, 2]
    prompts = _seeded_prompts(seeds)
    first = teacher_images(handle, prompts, seeds, 4, None, None, cache_dir=tmp_path)
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(b"not a zip")
    n_calls = len(calls)
    again = teacher_images(handle, prompts, seeds, 4, None, None, cache_dir=tmp_path)
    assert len(calls) > n_calls and np.array_equal(first, again)


def test_quality_identical_demo_images():
    images, prompts = _scenes(6, seed=4)
    q = quality(images, images.copy(), prompts, demo=True)
    assert q["psnr_vs_teacher"] == math.inf and q["identical_to_teacher"] is True
    assert q["ssim_vs_teacher"] == pytest.approx(1.0)
    assert q["frechet_vs_teacher"] < 1e-9
    assert q["prompt_accuracy"] == q["teacher_prompt_accuracy"]
    assert set(q["prompt_accuracy_by_attribute"]) == set(checker.ATTRIBUTES)
    assert q["teacher_prompt_accuracy_by_attribute"] == q["prompt_accuracy_by_attribute"]


def test_quality_damaged_and_non_demo():
    images, prompts = _scenes(6, seed=5)
    q = quality(images, _blur(images, 1.5), prompts, demo=True)
    assert 15.0 < q["psnr_vs_teacher"] < 40.0 and q["identical_to_teacher"] is False
    assert q["ssim_vs_teacher"] < 0.99 and q["frechet_vs_teacher"] > 0
    plain = quality(images, _blur(images, 1.5), prompts, demo=False)
    assert plain["prompt_accuracy"] is None and plain["teacher_prompt_accuracy"] is None
    foreign = quality(images, images, ["a photo of a cat"] * 6, demo=True)
    assert foreign["prompt_accuracy"] is None
    no_teacher = quality(None, images, prompts, demo=True)
    assert no_teacher["psnr_vs_teacher"] is None and no_teacher["prompt_accuracy"] is not None
