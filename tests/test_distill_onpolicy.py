"""distill on_policy: the student's own trajectories are sampled at the set points and used for
the set share of every batch; a run interrupted after that resumes on the very same set."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import compress
from compress.errors import UserError
from compress.train import onpolicy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _recipe(steps: int, on_policy: dict | None, every: int = 0) -> dict:
    d = {"steps": steps, "batch": 2, "lr": 0.001, "warmup": 1, "checkpoint_every": every,
         "data": {"num_prompts": 2, "seeds_per_prompt": 1}}
    if on_policy is not None:
        d["on_policy"] = on_policy
    return {"name": "onpolicy", "calibration": {"num_prompts": 2, "steps": 3},
            "passes": [{"prune_depth": {"method": "last", "remove": 1}}, {"distill": d}],
            "eval": {"enabled": False, "latency": False}}


def _weights(out) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted((out / "transformer").glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def test_student_trajectories_are_sampled_and_used(tiny_pipeline_dir, tmp_path, monkeypatch):
    src = tiny_pipeline_dir("pixart")
    drawn, sets = [], []

    class _Counted:  # the student's set, counting the samples drawn from it
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def sample(self, i):
            drawn.append(i)
            return self.inner.sample(i)

    real = onpolicy.StudentTrajectories._sample

    def counted(self, step):
        got = real(self, step)
        sets.append((self.teacher, got))
        return _Counted(got)

    monkeypatch.setattr(onpolicy.StudentTrajectories, "_sample", counted)
    rep = compress.run_recipe(_recipe(8, {"start": 0.5, "times": 2, "share": 0.5}), str(src),
                              out=None, cache_dir=tmp_path / "cache")
    d = rep["passes"][1]["on_policy"]
    assert d["sampled_at_steps"] == [4, 6]
    assert set(d["calls"].values()) == {rep["passes"][1]["samples"]}  # same prompts and seeds
    assert set(d["sampling_seconds"]) == {"4", "6"}
    assert all(v >= 0 for v in d["sampling_seconds"].values())
    # nothing from it before step 4; 8 draws after, about half of them the student's
    assert 1 <= len(drawn) <= 7, drawn
    # the student's inputs are its own: the first call of a trajectory equals the original's
    # (same seed, same noise), a later one has moved (the pruned student went elsewhere)
    teacher, student = sets[0]
    def latents(cs, i):
        x = cs.sample(i)
        return x.args[0] if x.args else x.kwargs["hidden_states"]

    n_steps = len(teacher) // 2
    assert torch.equal(latents(teacher, 0), latents(student, 0))
    assert not torch.allclose(latents(teacher, n_steps - 1), latents(student, n_steps - 1))


def test_mixing_share_and_points():
    class _Set:
        def __init__(self, tag, n):
            self.tag, self.n = tag, n

        def __len__(self):
            return self.n

        def sample(self, i):
            return (self.tag, i)

    st = onpolicy.StudentTrajectories(None, _Set("t", 10), torch.nn.Linear(1, 1), 100, 0.5, 2,
                                      0.25)
    assert st.points == [50, 75]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(onpolicy.VIRTUAL, (4000,), generator=g).tolist()
    assert all(st.sample(i)[0] == "t" for i in idx[:100])  # nothing sampled yet: the original's
    st.current = _Set("s", 7)
    frac = sum(st.sample(i)[0] == "s" for i in idx) / len(idx)
    assert abs(frac - 0.25) < 0.03
    assert all(st.sample(i)[1] < 7 for i in idx if st.sample(i)[0] == "s")


def test_interrupted_run_resumes_on_the_same_student_set(tiny_pipeline_dir, tmp_path,
                                                          monkeypatch):
    src = tiny_pipeline_dir("pixart")
    op = {"start": 0.4, "times": 1, "share": 0.5}
    compress.run_recipe(_recipe(10, op, every=2), str(src), out=tmp_path / "full",
                        cache_dir=tmp_path / "c1")
    real = onpolicy.StudentTrajectories.on_step

    def stop_at_7(self, step):
        if step == 7:
            raise KeyboardInterrupt
        real(self, step)

    monkeypatch.setattr(onpolicy.StudentTrajectories, "on_step", stop_at_7)
    with pytest.raises(KeyboardInterrupt):
        compress.run_recipe(_recipe(10, op, every=2), str(src), out=tmp_path / "cut",
                            cache_dir=tmp_path / "c2")
    monkeypatch.setattr(onpolicy.StudentTrajectories, "on_step", real)
    captures = []
    real_capture = onpolicy.StudentTrajectories._capture

    def spy(self, key, only_cached=False):
        captures.append(only_cached)
        return real_capture(self, key, only_cached)

    monkeypatch.setattr(onpolicy.StudentTrajectories, "_capture", spy)
    rep = compress.run_recipe(_recipe(10, op, every=2), str(src), out=tmp_path / "cut",
                              cache_dir=tmp_path / "c2", resume=True)
    assert rep["passes"][1]["resumed_from_step"] == 6
    assert captures == [True]  # the set sampled at step 4, from the cache: not sampled again
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_own_module_and_refusals(tmp_path):
    from compress.demo.shapedit import ShapeDiT, sample_seeds

    torch.manual_seed(0)
    m = ShapeDiT(width=32, depth=3, heads=2).eval()

    def calibrate(mod, n=2):
        sample_seeds(mod, [11 + j for j in range(n)], steps=3)

    r = _recipe(4, {"start": 0.5, "share": 1.0})
    rep = compress.run_recipe(r, m, calibrate_fn=calibrate, out=None, cache_dir=tmp_path)
    d = rep["passes"][1]
    assert d["on_policy"]["sampled_at_steps"] == [2]
    assert d["on_policy"]["calls"] == {"2": d["samples"]}
    bad = _recipe(4, {"start": 0.5})
    bad["passes"][1]["distill"]["mode"] = "intervals"
    with pytest.raises(UserError, match="on_policy needs mode kd"):
        compress.run_recipe(bad, m, calibrate_fn=calibrate, out=None, cache_dir=tmp_path)
    bad = _recipe(4, {"start": 1.5})
    with pytest.raises(UserError, match="start"):
        compress.run_recipe(bad, m, calibrate_fn=calibrate, out=None, cache_dir=tmp_path)
