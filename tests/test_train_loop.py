"""The training loop's weight average (``ema``): what the run ends with, and resuming."""

from __future__ import annotations

import torch

from compress.train.loop import TrainSettings, ema_decay, train


def _run(tmp_path, steps: int, ema: float, resume: bool = False, stop: int | None = None):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(3))
    target = torch.tensor([1.0, -2.0, 0.5])
    seen: list[torch.Tensor] = []

    def loss_fn(idx, step):
        if stop is not None and step == stop:
            raise KeyboardInterrupt
        noise = torch.randn(3, generator=torch.Generator().manual_seed(step))
        return ((p - target - 0.3 * noise) ** 2).sum(), {}

    s = TrainSettings(steps=steps, batch=1, lr=0.1, grad_clip=None, checkpoint_every=5, ema=ema)

    def on_step(step):
        seen.append(p.detach().clone())

    train([("p", p)], loss_fn, 4, s, ckpt_dir=tmp_path, resume=resume, on_step=on_step)
    return p.detach().clone(), seen


def test_run_ends_with_the_average_of_its_steps(tmp_path):
    final, seen = _run(tmp_path / "a", 40, 0.9)
    last, _ = _run(tmp_path / "b", 40, 0.0)
    # the average by hand: each step's weights after the optimiser update
    weights = seen[1:] + [last]
    e = seen[0].float().clone()
    for step, w in enumerate(weights):
        e = e.lerp(w, 1 - ema_decay(step, 0.9))
    assert torch.allclose(final, e, atol=1e-6)
    assert not torch.allclose(final, last, atol=1e-3)  # the average, not the last step


def test_resumed_run_keeps_the_average(tmp_path):
    whole, _ = _run(tmp_path / "whole", 20, 0.8)
    try:
        _run(tmp_path / "cut", 20, 0.8, stop=12)
    except KeyboardInterrupt:
        pass
    resumed, _ = _run(tmp_path / "cut", 20, 0.8, resume=True)
    assert torch.allclose(whole, resumed, atol=1e-6)
