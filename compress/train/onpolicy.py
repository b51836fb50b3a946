"""On-policy distillation data: the student's own trajectories, sampled during training.

Distillation trains on the original's trajectories, but the student samples along its own: an
early error moves every later input off the path it was trained on, and the error grows. Here,
at a few points of the training (``start`` .. the end, evenly), the distillation set's prompts
and seeds are run again through the pipeline (or a user's ``calibrate_fn``) with the student in
place, and from then on a ``share`` of every batch comes from those calls; the original still
gives every target (it runs live on each sample's inputs), so the student learns what the
original would predict where the student actually goes.

Determinism: which samples a batch draws is a function of (seed, step) as before (the train
loop's virtual indices below), and a student set is cached under the hash of the student's
weights when it was sampled; training checkpoints keep that key, so a resumed run trains on the
very set the uninterrupted run sampled.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from compress.errors import UserError

log = logging.getLogger(__name__)

VIRTUAL = 1 << 30  # the train loop's index space when two sets are mixed
_COIN = 10_000


class StudentTrajectories:
    """The teacher's set plus, once sampled, the student's; maps the loop's indices to samples."""

    def __init__(self, handle: Any, teacher_set: Any, student: nn.Module, steps: int,
                 start: float, times: int, share: float, calibrate: Any = None,
                 route_noise: float = 0.0) -> None:
        self.handle, self.teacher, self.student = handle, teacher_set, student
        self.share, self.route_noise = share, route_noise
        self.calibrate = calibrate  # a user's module: the callable that samples it
        span = steps * (1.0 - start) / times
        self.points = sorted({min(steps - 1, max(1, round(steps * start + k * span)))
                              for k in range(times)})
        self.sets: dict[int, Any] = {}  # point -> CalibrationSet
        self.keys: dict[int, str] = {}  # point -> cache key of that set
        self.seconds: dict[int, float] = {}  # point -> seconds its sampling took here
        self.current: Any = None

    # -- the loop's indices -------------------------------------------------------------------

    def n_indices(self) -> int:
        return VIRTUAL

    def sample(self, i: int):
        """Virtual index ``i`` (uniform in [0, VIRTUAL)) -> a sample: from the student's set
        with probability ``share`` once there is one (the coin from the index's high bits, so
        every process of a distributed run agrees), else from the original's."""
        if self.current is not None and (i >> 12) % _COIN < self.share * _COIN:
            return self.current.sample(i % len(self.current))
        return self.teacher.sample(i % len(self.teacher))

    # -- sampling ------------------------------------------------------------------------------

    def on_step(self, step: int) -> None:
        """Before ``step``: the newest set due by then is in use (sampled now if it is due now,
        or reloaded from the cache after ``--resume``)."""
        due = [p for p in self.points if p <= step]
        if not due:
            return
        p = due[-1]
        if self.current is not None and self.sets.get(p) is self.current:
            return
        if p in self.keys:  # resumed after this point: the set it sampled, from the cache
            self.current = self.sets[p] = self._cached(self.keys[p])
        elif p == step:
            self.current = self.sets[p] = self._sample(step)
        else:
            raise UserError(f"distill on_policy: resumed at step {step}, after the student's "
                            f"trajectories were sampled (step {p}), from a checkpoint that does "
                            "not name them; run without --resume to start over")

    def _key(self) -> str:
        from compress.calib.capture import state_hash

        return "student:" + state_hash(self.student)

    def _sample(self, step: int):
        from compress.modules import mob

        t0 = time.perf_counter()
        was_training = self.student.training
        self.student.eval()
        mob.explore(self.student, 0.0)  # sampled as it will run: each router's own choice
        try:
            key = self._key()
            with torch.no_grad():
                got = self._capture(key)
        finally:
            mob.explore(self.student, self.route_noise)
            self.student.train(was_training)
        log.info("distill on_policy: %d calls of the student's own trajectories at step %d",
                 len(got), step)
        self.keys[step] = key  # (called at a sampling point)
        self.seconds[step] = round(time.perf_counter() - t0, 1)
        return got

    def _cached(self, key: str):
        got = self._capture(key, only_cached=True)
        if got is None:
            raise UserError("distill on_policy: the student's trajectories named by the "
                            "checkpoint are no longer in the calibration cache; run without "
                            "--resume to start over")
        return got

    def _capture(self, key: str, only_cached: bool = False):
        from compress.calib.capture import capture, capture_generic

        meta = self.teacher.meta
        cache = self.handle.run.get("cache")
        if meta.get("kind") == "pipeline":
            return capture(
                self.handle, meta["prompts"], seeds=meta["seeds"], steps=meta["steps"],
                guidance=meta["guidance"], resolution=meta["resolution"],
                capture_steps=meta.get("capture_steps"), cache_dir=cache,
                device=self.handle.run.get("device", "cpu"), progress=False, model_key=key,
                cached_only=only_cached)
        if self.calibrate is None:
            raise UserError("distill on_policy needs a pipeline or a calibrate_fn to sample the "
                            "student's trajectories with")
        return capture_generic(self.student, self.calibrate, cache_dir=cache, key=key,
                                   cached_only=only_cached)

    # -- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        return {f"onpolicy.{p}": torch.tensor(list(k.encode()), dtype=torch.uint8)
                for p, k in self.keys.items()}

    def load_state(self, extra: dict[str, torch.Tensor]) -> None:
        for name, t in extra.items():
            if name.startswith("onpolicy."):
                self.keys[int(name.split(".", 1)[1])] = bytes(t.tolist()).decode()

    def report(self) -> dict[str, Any]:
        return {"sampled_at_steps": sorted(self.keys), "share": self.share,
                "calls": {str(p): len(s) for p, s in sorted(self.sets.items())},
                # (a set reloaded after --resume took no time in this run)
                "sampling_seconds": {str(p): v for p, v in sorted(self.seconds.items())}}

