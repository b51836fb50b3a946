"""LoRA adapters made for the original model on compressed outputs (issue 17): diffusers'
``load_lora_weights`` and PEFT's own API work on every compressed layer type as a side branch
beside the compressed weights (strength, unloading, fusing by re-quantisation, exact unfusing);
keys of removed blocks, pruned channels and expert layers are re-addressed or left out with one
warning; ``run --lora`` compresses the model with the LoRA fused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tiny_pipelines import first_call_inputs
from torch import nn

import compress
from compress.errors import UserError
from compress.lora.layer import install, lora_class

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TINY = {"calibration": {"num_prompts": 2, "steps": 3},
        "eval": {"num_prompts": 2, "steps": 3, "latency": False}}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj", "net.2"]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    err = (a - b).pow(2).mean().clamp_min(1e-20)
    return float(10 * torch.log10(b.pow(2).mean() / err))


def _make_lora(pipe_dir, path, r: int = 4, alpha: int = 8, seed: int = 1,
               rank_pattern: dict | None = None):
    """A LoRA for the original transformer, saved as diffusers/PEFT keys with its alpha."""
    from diffusers import DiffusionPipeline

    tr = DiffusionPipeline.from_pretrained(str(pipe_dir)).transformer
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False,
                     rank_pattern=rank_pattern or {})
    inject_adapter_in_model(cfg, tr)
    sd = get_peft_model_state_dict(tr)
    # diffusers' own layout of the adapter's config (what save_lora_weights writes)
    packed = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v
              for k, v in cfg.to_dict().items()}
    meta = {"lora_adapter_metadata": json.dumps(packed, default=str)}
    save_file({f"transformer.{k}": v.contiguous() for k, v in sd.items()}, str(path), meta)
    return sd


def _original(pipe_dir):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(pipe_dir))


def _run(tr, family):
    args, kw = first_call_inputs(family)
    with torch.no_grad():
        return tr(*args, **kw)[0]


@pytest.mark.parametrize(("family", "ptq"), [
    ("sd3", {"weights": {"bits": 8}, "activations": {"bits": 8}}),
    ("flux", {"weights": {"bits": 4, "group_size": 16}})])
def test_stock_load_lora_weights_on_compressed_output(family, ptq, tiny_pipeline_dir, tmp_path,
                                                       monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = tiny_pipeline_dir(family)
    compress.run_recipe({"name": "t", **TINY, "passes": [{"ptq": ptq}]}, str(src), tmp_path / "o")
    _make_lora(src, tmp_path / "l.safetensors")
    o = _original(src)
    base = _run(o.transformer, family)
    o.load_lora_weights(str(tmp_path / "l.safetensors"), adapter_name="x")
    ref = _run(o.transformer, family)
    assert _psnr(base, ref) < 30  # the LoRA changes the output

    q = compress.load_pipeline(tmp_path / "o")
    qb = _run(q.transformer, family)
    q.load_lora_weights(str(tmp_path / "l.safetensors"), adapter_name="x")  # stock call
    assert any(isinstance(m, lora_class()) for m in q.transformer.modules())
    ql = _run(q.transformer, family)
    assert _psnr(ql, ref) > min(_psnr(qb, base) - 3, 40)
    q.set_adapters("x", 0.0)  # strength 0: the compressed output exactly
    assert torch.equal(_run(q.transformer, family), qb)
    q.set_adapters("x", 1.0)
    q.fuse_lora()  # folded by re-quantising: close to the side branch
    qf = _run(q.transformer, family)
    assert _psnr(qf, ql) > 25
    q.unfuse_lora()  # the stored codes come back exactly
    q.unload_lora_weights()
    qlay = [m for m in q.transformer.modules() if hasattr(m, "qweight") or hasattr(m, "weight")]
    assert qlay and _psnr(_run(q.transformer, family), qb) > 60


def _linear(i=48, o=40, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(i, o)
    return lin


def _kinds():
    from compress.modules.fp8_linear import FP8Linear
    from compress.modules.int4 import Int4Linear
    from compress.modules.qlinear import QLinear
    from compress.modules.vq_linear import VQLinear
    from compress.modules.w4a8 import W4A8Linear
    from compress.modules.w8a8 import W8A8Linear
    from compress.quant import qtensor

    def vq(lin):
        torch.manual_seed(3)
        books = torch.randn(1, 16, 2) * lin.weight.std()
        w = lin.weight.detach().reshape(lin.out_features, -1, 2)
        idx = torch.cdist(w.reshape(-1, 2), books[0]).argmin(1).view(lin.out_features, -1)
        return VQLinear.from_assignment(books, idx, lin.bias, None)

    def w4a8(lin):
        codes, scale, _ = qtensor.quantize(lin.weight.detach(), 4, None, True)
        return W4A8Linear.from_codes(codes, scale, lin.bias)

    return {
        "int8": lambda lin: QLinear.from_linear(lin, 8),
        "int4-g16": lambda lin: QLinear.from_linear(lin, 4, 16, symmetric=False),
        "int4-packed": lambda lin: Int4Linear.from_linear(lin, 16),
        "w8a8-dynamic": lambda lin: W8A8Linear.from_linear(lin),
        "w8a8-static-smooth": lambda lin: W8A8Linear.from_linear(
            lin, act="static", act_scale=0.05, smooth=torch.rand(lin.in_features) + 0.5),
        "w4a8": w4a8,
        "fp8": lambda lin: FP8Linear.from_linear(lin),
        "vq": vq,
    }


@pytest.mark.parametrize("kind", list(_kinds()))
def test_side_branch_fold_and_exact_unfold_on_every_layer_kind(kind):
    install()
    layer = _kinds()[kind](_linear())
    net = nn.Sequential(layer)
    net.register_parameter("anchor", nn.Parameter(torch.zeros(1)))  # models have float params
    x = torch.randn(5, 48)
    with torch.no_grad():
        y0 = net(x)
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                       init_lora_weights=False), net)
    wrapped = net[0]
    assert isinstance(wrapped, lora_class())
    with torch.no_grad():
        a, b = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
        b.mul_(5)
        delta = 2.0 * b @ a
        y1 = net(x)
    assert torch.allclose(y1, y0 + x @ delta.T, atol=1e-5)  # exact side branch
    wrapped.set_scale("default", 0.5)
    with torch.no_grad():
        assert torch.allclose(net(x), y0 + 0.5 * x @ delta.T, atol=1e-5)
    wrapped.set_scale("default", 1.0)
    with pytest.warns(UserWarning, match="re-quantising"):
        wrapped.merge()
    with torch.no_grad():
        yf = net(x)
    # folded: the layer stores (W + delta) in its own format, about as well as that format
    # stores the float sum compressed from scratch
    fused = _linear()
    with torch.no_grad():
        fused.weight += delta
        want = fused(x)
        scratch = _kinds()[kind](fused)(x)
    err_fold = (yf - want).pow(2).mean()
    err_scratch = (scratch - want).pow(2).mean()
    assert err_fold < 4 * err_scratch + 1e-7, (float(err_fold), float(err_scratch))
    wrapped.unmerge()
    for k, v in layer.state_dict().items():
        assert torch.equal(v, stored[k]), k
    with torch.no_grad():
        assert torch.equal(net(x), y1)


def test_w8a8_feedforward_adds_the_branch_before_its_fused_gelu():
    from diffusers.models.attention import FeedForward

    from compress.modules.w8a8 import W8A8Linear, fuse_feedforwards

    install()
    torch.manual_seed(0)
    ff = FeedForward(32, activation_fn="gelu-approximate").eval()
    ref = FeedForward(32, activation_fn="gelu-approximate").eval()
    ref.load_state_dict(ff.state_dict())
    ff.net[0].proj = W8A8Linear.from_linear(ff.net[0].proj)
    ff.net[2] = W8A8Linear.from_linear(ff.net[2])
    root = nn.Module()
    root.ff = ff
    root.anchor = nn.Parameter(torch.zeros(1))  # PEFT looks for one float parameter
    assert fuse_feedforwards(root) == ["ff"]
    x = torch.randn(2, 6, 32)
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["net.0.proj"], init_lora_weights=False)
    inject_adapter_in_model(cfg, root)
    inject_adapter_in_model(cfg, ref)
    lay, lr = root.ff.net[0].proj, ref.net[0].proj
    with torch.no_grad():
        lay.lora_A["default"].weight.copy_(lr.lora_A["default"].weight)
        lay.lora_B["default"].weight.copy_(lr.lora_B["default"].weight * 20)
        lr.lora_B["default"].weight.mul_(20)
        got, want = root.ff(x), ref(x)
    assert _psnr(got, want) > 35


def test_peft_api_and_load_lora_on_pixart_without_a_loader(tiny_pipeline_dir, tmp_path,
                                                           monkeypatch):
    from peft import set_peft_model_state_dict

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = tiny_pipeline_dir("pixart")
    compress.run_recipe({"name": "t", **TINY, "passes": [
        {"ptq": {"weights": {"bits": 4, "group_size": 16}}}]}, str(src), tmp_path / "o")
    sd = _make_lora(src, tmp_path / "l.safetensors")
    o = _original(src)
    base = _run(o.transformer, "pixart")
    assert not hasattr(o, "load_lora_weights")
    compress.load_lora(o, tmp_path / "l.safetensors")
    ref = _run(o.transformer, "pixart")
    q = compress.load_pipeline(tmp_path / "o")
    qb = _run(q.transformer, "pixart")
    name = compress.load_lora(q, tmp_path / "l.safetensors", scale=1.0)
    ql = _run(q.transformer, "pixart")
    assert _psnr(base, ref) < 30 and _psnr(ql, ref) > _psnr(qb, base) - 6  # a random, strong LoRA
    compress.unload_lora(q)
    assert torch.equal(_run(q.transformer, "pixart"), qb)
    # PEFT's own API on the compressed transformer gives the same
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), q.transformer,
                            adapter_name="p")
    set_peft_model_state_dict(q.transformer, sd, adapter_name="p")
    assert torch.allclose(_run(q.transformer, "pixart"), ql, atol=1e-5)
    assert name == "lora0"


def test_lora_on_own_module_output(tmp_path):
    from compress.demo.shapedit import ShapeDiT, sample_seeds

    torch.manual_seed(0)
    m = ShapeDiT(width=64, depth=2, heads=2).eval()
    compress.run_recipe({"name": "t", "calibration": {"num_prompts": 2},
                         "passes": [{"ptq": {"weights": {"bits": 8}}}]}, m, tmp_path / "o",
                        calibrate_fn=lambda mod: sample_seeds(mod, [11, 12], steps=4))
    lm = ShapeDiT(width=64, depth=2, heads=2).eval()
    lm.load_state_dict(m.state_dict())
    torch.manual_seed(1)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["lin_a", "lin_c"],
                                       init_lora_weights=False), lm)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(lm).items()},
              str(tmp_path / "l.safetensors"))
    q = compress.load_module(tmp_path / "o", ShapeDiT(width=64, depth=2, heads=2))
    g = torch.Generator().manual_seed(3)
    x, t, c = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([7, 800]), torch.tensor([5, 4])
    with torch.no_grad():
        base, qb = m(x, t, c), q(x, t, c)
        ref = lm(x, t, c)
        compress.load_lora(q, tmp_path / "l.safetensors")
        ql = q(x, t, c)
    assert _psnr(base, ref) < 35 and _psnr(ql, ref) > _psnr(qb, base) - 3


def _match_rows(small: torch.Tensor, big: torch.Tensor) -> list[int]:
    return [int((big == r).all(1).nonzero()[0]) for r in small]


def test_pruned_outputs_readdress_blocks_and_channels(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = tiny_pipeline_dir("pixart")
    compress.run_recipe({"name": "t", **TINY, "passes": [
        {"prune_depth": {"method": "list", "blocks": ["transformer_blocks.0"]}},
        {"prune_width": {"method": "magnitude", "head_ratio": 0.5, "channel_ratio": 0.5}}]},
        str(src), tmp_path / "o")
    sd = _make_lora(src, tmp_path / "l.safetensors")
    o = _original(src).transformer
    q = compress.load_pipeline(tmp_path / "o").transformer
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        compress.load_lora(q, tmp_path / "l.safetensors")
    msgs = [str(w.message) for w in rec if "LoRA" in str(w.message)]
    assert len(msgs) == 1 and "transformer_blocks.0.attn1.to_q: its block was removed" in msgs[0]
    omods = dict(o.named_modules())
    n = 0
    for path, m in q.named_modules():
        if not isinstance(m, peft.tuners.lora.LoraLayer):
            continue
        name = next(iter(m.lora_A))
        if not path.startswith("transformer_blocks."):  # outside the blocks: as in the file
            assert torch.equal(m.lora_A[name].weight, sd[f"{path}.lora_A.weight"])
            continue
        rest = path.split(".", 2)[2]
        w_new = m.get_base_layer().weight
        # the original block this layer came from: the one whose weight holds its rows/columns
        i = next(i for i in range(len(o.transformer_blocks))
                 if _contains(omods[f"transformer_blocks.{i}.{rest}"].weight, w_new))
        w_old = omods[f"transformer_blocks.{i}.{rest}"].weight
        a = sd[f"transformer_blocks.{i}.{rest}.lora_A.weight"]
        b = sd[f"transformer_blocks.{i}.{rest}.lora_B.weight"]
        full = b @ a
        if w_new.shape[1] == w_old.shape[1]:
            rows = _match_rows(w_new, w_old)
            want = full[rows]
        else:
            cols = _match_rows(w_new.T, w_old.T)
            want = full[:, cols]
        got = m.lora_B[name].weight @ m.lora_A[name].weight
        assert torch.allclose(got, want, atol=1e-6), path
        n += 1
    assert n >= 6


def _contains(big: torch.Tensor, small: torch.Tensor) -> bool:
    if big.shape[1] == small.shape[1]:
        return all(bool((big == r).all(1).any()) for r in small)
    if big.shape[0] == small.shape[0]:
        return all(bool((big.T == c).all(1).any()) for c in small.T)
    return False


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_moe_output_takes_the_feed_forward_adapter_per_expert(family, tiny_pipeline_dir,
                                                              tmp_path, monkeypatch):
    """With every expert chosen (top_k = experts) the MoE pair is the dense feed-forward, so the
    output + LoRA must match the original + LoRA: the first and last layers' adapters are split
    per expert by the recorded channel order (the FFN adapters left out would cost ~20 dB)."""
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = tiny_pipeline_dir(family)
    compress.run_recipe({"name": "t", **TINY, "passes": [
        {"to_moe": {"experts": 4, "top_k": 4, "shared": 0.25}}]}, str(src), tmp_path / "o")
    _make_lora(src, tmp_path / "l.safetensors", rank_pattern={"net.2": 6})  # a split layer's
    o = _original(src)
    compress.load_lora(o, tmp_path / "l.safetensors")
    ref = _run(o.transformer, family)
    q = compress.load_pipeline(tmp_path / "o")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key fits (no layer left out, no PEFT mismatch)
        compress.load_lora(q, tmp_path / "l.safetensors")
    hosts = [n for n, m in q.transformer.named_modules()
             if isinstance(m, peft.tuners.lora.LoraLayer) and ".experts." in n]
    assert hosts and any(".net.2.experts." in n for n in hosts)
    assert _psnr(_run(q.transformer, family), ref) > 60

    # an output whose to_moe did not record the channel order: FFN keys left out, named once
    q = compress.load_pipeline(tmp_path / "o")
    qb = _run(q.transformer, family)
    for p in q.transformer._dit_compress_passes:
        for u in p.get("meta", {}).get("units", []):
            u.pop("order", None)
    with pytest.warns(UserWarning, match=r"ff\.net\.0\.proj: split into experts.*channel order"):
        compress.load_lora(q, tmp_path / "l.safetensors")
    assert not torch.equal(_run(q.transformer, family), qb)  # attention adapters apply


def test_run_with_lora_compresses_the_model_with_it(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = tiny_pipeline_dir("pixart")
    _make_lora(src, tmp_path / "l.safetensors")
    rep = compress.run_recipe({"name": "t", **TINY, "passes": [{"ptq": {"weights": {"bits": 8}}}]},
                              str(src), tmp_path / "o", lora=tmp_path / "l.safetensors")
    assert rep["model"]["lora"]["layers"] > 0 and rep["model"]["lora"]["scale"] == 1.0
    o = _original(src)
    base = _run(o.transformer, "pixart")
    compress.load_lora(o, tmp_path / "l.safetensors")
    ref = _run(o.transformer, "pixart")
    q = _run(compress.load_pipeline(tmp_path / "o").transformer, "pixart")
    assert _psnr(q, ref) > 40 and _psnr(q, base) < 30
    with pytest.raises(UserError, match="no such file"):
        compress.run_recipe({"name": "t", **TINY, "passes": [{"ptq": {"weights": {"bits": 8}}}]},
                            str(src), tmp_path / "o2", lora=tmp_path / "missing.safetensors")
    assert not (tmp_path / "o2").exists()


def test_demo_red_lora_on_a_compressed_demo_output(tmp_path, monkeypatch):
    """The shipped demo LoRA, trained on the original, turns the W8A8 output's objects red as it
    does the original's, and its images stay as close to the original + LoRA as the output's
    own are to the original."""
    from compress.demo import load_demo_pipeline
    from compress.demo.lora import RED_LORA, lora_effect
    from compress.metrics.image import psnr

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    compress.run_recipe({"name": "w8a8", "calibration": {"num_prompts": 2, "steps": 8},
                         "passes": [{"ptq": {"weights": {"bits": 8},
                                             "activations": {"bits": 8}}}],
                         "eval": {"enabled": False, "latency": False}}, "demo", tmp_path / "o")
    caps = ["a large blue circle in the center", "a small green square at the top left",
            "a large yellow triangle at the bottom right"]

    def images(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(caps, num_inference_steps=8, output_type="np",
                    generator=[torch.Generator().manual_seed(i) for i in range(len(caps))]).images

    orig, q = load_demo_pipeline(), compress.load_pipeline(tmp_path / "o")
    base, qb = images(orig), images(q)
    compress.load_lora(orig, RED_LORA)
    compress.load_lora(q, RED_LORA)
    ref, ql = images(orig), images(q)
    assert lora_effect(base, caps) == 0 and lora_effect(qb, caps) == 0
    assert lora_effect(ref, caps) == 1 and lora_effect(ql, caps) == 1
    assert psnr(ql, ref) > psnr(qb, base) - 2


def test_peft_model_from_pretrained_on_a_compressed_transformer(tiny_pipeline_dir, tmp_path,
                                                                monkeypatch):
    from diffusers import DiffusionPipeline
    from peft import PeftModel, get_peft_model

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = tiny_pipeline_dir("pixart")
    compress.run_recipe({"name": "t", **TINY, "passes": [{"ptq": {"weights": {"bits": 8}}}]},
                        str(src), tmp_path / "o")
    torch.manual_seed(2)
    pm = get_peft_model(DiffusionPipeline.from_pretrained(str(src)).transformer, LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "adapter"))  # a PEFT adapter folder
    ref = _run(pm, "pixart")
    qm = PeftModel.from_pretrained(compress.load_pipeline(tmp_path / "o").transformer,
                                   str(tmp_path / "adapter"))
    got = _run(qm, "pixart")
    q = compress.load_pipeline(tmp_path / "o").transformer
    compress.load_lora(q, tmp_path / "adapter")  # the same folder through compress.load_lora
    assert torch.allclose(_run(q, "pixart"), got, atol=1e-5)
    assert _psnr(got, ref) > 40


def test_stock_load_lora_weights_readdresses_a_depth_pruned_sd3(tiny_pipeline_dir, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = tiny_pipeline_dir("sd3")
    compress.run_recipe({"name": "t", **TINY, "passes": [
        {"prune_depth": {"method": "list", "blocks": ["transformer_blocks.0"]}}]},
        str(src), tmp_path / "o")
    sd = _make_lora(src, tmp_path / "l.safetensors")
    q = compress.load_pipeline(tmp_path / "o")
    with pytest.warns(UserWarning, match=r"transformer_blocks\.0\.attn\.to_q: its block was "
                                         r"removed by depth pruning"):
        q.load_lora_weights(str(tmp_path / "l.safetensors"), adapter_name="x")  # stock call
    # block 1 of the original is block 0 now, and carries block 1's adapter
    got = q.transformer.transformer_blocks[0].attn.to_q.lora_A["x"].weight
    assert torch.equal(got, sd["transformer_blocks.1.attn.to_q.lora_A.weight"])


def test_load_lora_on_a_module_without_parameters():
    """A fully compressed own module (codes in buffers, norms without affine weights) has no
    nn.Parameter at all; PEFT's injection read its device off the first one and failed."""
    from compress.modules.qlinear import QLinear

    class Own(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(16, elementwise_affine=False)
            self.fc1 = QLinear.from_linear(nn.Linear(16, 16, bias=False), 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc1(self.norm(x))

    torch.manual_seed(0)
    m = Own()
    assert not list(m.parameters())
    a, b = torch.randn(4, 16), torch.randn(16, 4)
    x = torch.randn(3, 16)
    with torch.no_grad():
        y0 = m(x)
        compress.load_lora(m, {"fc1.lora_A.weight": a, "fc1.lora_B.weight": b}, scale=0.5)
        y1 = m(x)
    assert not hasattr(m, "_lora_device_probe")
    # alpha defaults to the rank: scaling 1, times the strength 0.5
    want = y0 + 0.5 * (m.norm(x) @ a.t()) @ b.t()
    assert (y1 - want).abs().max() < 1e-4 * want.abs().max()


def test_dynamic_feedforward_hand_over_keeps_both_branches(monkeypatch):
    """bf16 dynamic W8A8 feed-forward with adapters on both projections: the per-token hand-over
    still runs (the first branch joins before the GELU in the rescale pass, the second's
    down-projection runs on the hidden codes) and matches the float model with its adapters;
    an adapter with dropout, which needs the float hidden, falls back to the layers one by
    one."""
    from diffusers.models.attention import FeedForward

    from compress.lora import int8_down
    from compress.modules.w8a8 import W8A8Linear, fuse_feedforwards

    monkeypatch.setenv("DIT_COMPRESS_LORA_DOWN", "int8")
    int8_down.int8_faster.cache_clear()
    install()
    try:
        torch.manual_seed(0)
        ff = FeedForward(64, activation_fn="gelu-approximate").eval()
        ref = FeedForward(64, activation_fn="gelu-approximate").eval()
        ref.load_state_dict(ff.state_dict())
        ff.net[0].proj = W8A8Linear.from_linear(ff.net[0].proj)
        ff.net[2] = W8A8Linear.from_linear(ff.net[2], smooth=torch.rand(256) + 0.5)
        ff = ff.to(torch.bfloat16)
        root = nn.Module()
        root.ff = ff
        root.anchor = nn.Parameter(torch.zeros(1))
        assert fuse_feedforwards(root) == ["ff"]
        cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["net.0.proj", "net.2"],
                         init_lora_weights=False)
        inject_adapter_in_model(cfg, root)
        inject_adapter_in_model(cfg, ref)
        for name in ("net.0.proj", "net.2"):
            lay, lr = root.ff.get_submodule(name), ref.get_submodule(name)
            with torch.no_grad():
                lay.lora_A["default"].weight.copy_(lr.lora_A["default"].weight)
                lr.lora_B["default"].weight.mul_(20)
                lay.lora_B["default"].weight.copy_(lr.lora_B["default"].weight)
        root.to(torch.bfloat16)
        calls = []
        real = W8A8Linear.matmul_requantize

        def spy(self, xq, xs, nxt, addend=None):
            calls.append(addend is not None)
            return real(self, xq, xs, nxt, addend)

        monkeypatch.setattr(W8A8Linear, "matmul_requantize", spy)
        x = torch.randn(2, 24, 64)
        with torch.no_grad():
            got = root.ff(x.to(torch.bfloat16)).float()
            want = ref(x)
            # without the second adapter's branch the output is clearly off: it counts
            root.ff.net[2].lora_B["default"].weight.zero_()
            without = root.ff(x.to(torch.bfloat16)).float()
        assert calls == [True, True]  # the hand-over ran, with the first branch as addend
        assert _psnr(got, want) > 30, _psnr(got, want)
        assert _psnr(without, want) < _psnr(got, want) - 6
        with torch.no_grad():
            root.ff.net[2].lora_B["default"].weight.copy_(ref.net[2].lora_B["default"].weight)
        root.ff.net[2].lora_dropout["default"] = nn.Dropout(0.5).eval()  # eval: an identity
        calls.clear()
        with torch.no_grad():
            fallback = root.ff(x.to(torch.bfloat16)).float()
        assert calls == []
        assert _psnr(fallback, want) > 30
    finally:
        int8_down.int8_faster.cache_clear()


@pytest.mark.parametrize("smooth", [False, True])
def test_int8_down_projection_on_the_layers_codes_follows_the_adapter(smooth, monkeypatch):
    """The branch's x A^T from a dynamic W8A8 layer's int8 input codes: within 8-bit rounding
    of the float branch, smoothing folded into A, re-quantised when the adapter changes."""
    from compress.lora import int8_down
    from compress.modules.w8a8 import W8A8Linear

    monkeypatch.setenv("DIT_COMPRESS_LORA_DOWN", "int8")
    int8_down.int8_faster.cache_clear()
    install()
    try:
        lin = _linear(64, 48)
        s = torch.rand(64) + 0.5 if smooth else None
        net = nn.Sequential(W8A8Linear.from_linear(lin, smooth=s))
        net.register_parameter("anchor", nn.Parameter(torch.zeros(1)))
        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=["0"],
                                           init_lora_weights=False), net)
        wrapped = net[0]
        x = torch.randn(40, 64) * torch.linspace(0.2, 3, 64)  # uneven channels
        for round_ in range(2):
            with torch.no_grad():
                got = wrapped._side_branch(x, None)
                a, b = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
                want = x @ a.T @ b.T
            sqnr = 10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean())
            assert sqnr > 35, (round_, float(sqnr))
            assert "default" in wrapped.__dict__["_int8_down"]  # the int8 form ran
            with torch.no_grad():
                if round_ == 0:
                    a.mul_(-2).add_(0.1)  # the adapter changes: the cached codes must follow
        # a new weight tensor (as a re-loaded adapter brings) is quantised anew too
        wrapped.lora_A["default"].weight = nn.Parameter(torch.randn(8, 64))
        with torch.no_grad():
            got = wrapped._side_branch(x, None)
            a, b = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
            want = x @ a.T @ b.T
        assert 10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean()) > 35
        monkeypatch.setenv("DIT_COMPRESS_LORA_DOWN", "float")
        int8_down.int8_faster.cache_clear()
        with torch.no_grad():
            exact = wrapped._side_branch(x, None)
            a, b = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
        assert torch.allclose(exact, x @ a.T @ b.T, atol=1e-5)
    finally:
        int8_down.int8_faster.cache_clear()


def test_int8_down_projection_of_weights_made_in_inference_mode():
    """Tensors made under inference_mode have no version counter; the cached codes must still
    be made and reused (weight_cache's stamp)."""
    from compress.lora import int8_down
    from compress.modules.w8a8 import W8A8Linear

    with torch.inference_mode():
        base = W8A8Linear.from_linear(_linear(64, 48))
        host = nn.Module()
        host.lora_A = nn.ModuleDict({"d": nn.Linear(64, 8, bias=False)})
        x = torch.randn(40, 64)
        h = int8_down.down(host, "d", base, x, torch.float32)
        want = x @ host.lora_A["d"].weight.T
        assert 10 * torch.log10(want.pow(2).mean() / (h - want).pow(2).mean()) > 35
        assert torch.equal(int8_down.down(host, "d", base, x, torch.float32), h)
