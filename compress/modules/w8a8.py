"""W8A8Linear: int8 weights and int8 activations on a real int8 GEMM, and timestep-group scales.

Stored state is plain tensors (``weight`` int8 [out, in], ``weight_scale`` fp32 [out], ``bias``
fp32 [out], ``act_scale`` fp32 [n_groups] for static activations, ``smooth`` fp32 [in] when
channel balancing is on), so it saves to safetensors and reloads bit-equal. Everything the
kernel needs beyond that (oneDNN's packed weight, reciprocal scales) is derived lazily at the
first forward and rebuilt whenever a buffer changes.

Activations are quantised per token on the fly (``act="dynamic"``) or with a calibrated
per-tensor scale (``act="static"``). Static scales may differ per group of denoising steps: a
:class:`TimestepContext` shared by all layers holds the current group, and a forward pre-hook on
the transformer sets it from the ``timestep`` argument (:func:`attach_timestep_context`).
"""

from __future__ import annotations

import bisect
import inspect
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from compress.modules import w8a8_dense, weight_cache
from compress.quant import kernels

ACT_MODES = ("dynamic", "static")


# ---------------------------------------------------------------------------------------------
# timestep groups


@dataclass
class TimestepContext:
    """Maps a diffusion timestep to a group index; the current group is shared by all layers.

    ``boundaries`` are ascending; group ``i`` holds timesteps ``t`` with
    ``boundaries[i-1] <= t < boundaries[i]`` (so ``len(boundaries) + 1`` groups).
    """

    boundaries: list[float]
    group: int | None = field(default=None, compare=False)
    # under torch.compile: the group as a 0-d tensor (a Python int would specialise the graph)
    group_t: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.boundaries = [float(b) for b in self.boundaries]
        if any(a >= b for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"timestep boundaries must be strictly ascending: {self.boundaries}")

    @property
    def n_groups(self) -> int:
        return len(self.boundaries) + 1

    @classmethod
    def uniform(cls, n_groups: int, num_train_timesteps: int = 1000) -> TimestepContext:
        """Equal-width groups over [0, num_train_timesteps)."""
        step = num_train_timesteps / n_groups
        return cls([step * i for i in range(1, n_groups)])

    def group_of(self, timestep: torch.Tensor | float) -> int:
        # A batch (e.g. classifier-free guidance) shares one timestep in every diffusers
        # pipeline, so the first element decides for the whole batch.
        if isinstance(timestep, torch.Tensor):
            timestep = float(timestep.detach().reshape(-1)[0])
        return bisect.bisect_right(self.boundaries, float(timestep))

    def set_timestep(self, timestep: torch.Tensor | float) -> int | None:
        if torch.compiler.is_compiling():
            t = torch.as_tensor(timestep).reshape(-1)[:1].float()
            bounds = torch.tensor(self.boundaries, dtype=torch.float32, device=t.device)
            self.group_t = torch.bucketize(t, bounds, right=True)[0]
            return None
        self.group = self.group_of(timestep)
        return self.group

    def to_dict(self) -> dict[str, Any]:
        return {"boundaries": list(self.boundaries)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TimestepContext:
        return cls(list(d["boundaries"]))


def _timestep_getter(module: nn.Module) -> Callable[[tuple, dict], Any]:
    """A function pulling ``timestep`` out of a forward call, by keyword or by position."""
    try:
        params = list(inspect.signature(module.forward).parameters)
        pos = params.index("timestep")
    except ValueError:
        pos = None

    def get(args: tuple, kwargs: dict) -> Any:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        if pos is not None and pos < len(args):
            return args[pos]
        return None

    return get


def attach_timestep_context(transformer: nn.Module, ctx: TimestepContext) -> RemovableHandle:
    """Point every W8A8Linear under ``transformer`` at ``ctx`` and keep ``ctx.group`` current.

    Returns the pre-hook handle (``.remove()`` detaches the hook; modules keep the context).
    """
    for name, m in transformer.named_modules():
        if isinstance(m, W8A8Linear):
            if m.n_groups not in (1, ctx.n_groups):
                raise ValueError(
                    f"{name} has {m.n_groups} activation-scale groups but the timestep context "
                    f"has {ctx.n_groups}"
                )
            m.context = ctx
    get = _timestep_getter(transformer)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = get(args, kwargs)
        if t is not None:
            ctx.set_timestep(t)

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------------------------------------
# shared input quantisation

# q/k/v projections (and cross-attention k/v) read the very same tensor; quantising it once for
# all of them saves two of three passes. Keyed on tensor identity and version counter, and the
# cache holds a reference so the identity cannot be recycled.
_input_cache = threading.local()


def _cached(x: torch.Tensor, key: tuple) -> Any:
    if x.is_inference():  # no version counter: an in-place change could not be seen
        return None
    hit = getattr(_input_cache, "entry", None)
    if hit is not None and hit[0] is x and hit[1] == x._version and _same_key(hit[2], key):
        return hit[3]
    return None


def _same_key(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor):
            if not (
                isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor)
                and (u is v or (u.shape == v.shape and torch.equal(u, v)))
            ):
                return False
        elif u != v:
            return False
    return True


def _store(x: torch.Tensor, key: tuple, value: Any) -> None:
    if not x.is_inference():
        _input_cache.entry = (x, x._version, key, value)


def clear_input_cache() -> None:
    _input_cache.entry = None


# ---------------------------------------------------------------------------------------------
# the module


class W8A8Linear(nn.Module):
    """Drop-in ``nn.Linear`` running int8 x int8 with per-channel weight scales.

    Build with :meth:`from_linear` (or :meth:`from_int8` for codes from GPTQ), or with the
    constructor on ``device="meta"`` followed by ``load_state_dict(..., assign=True)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        act: str = "dynamic",
        n_groups: int = 1,
        smooth: bool = False,
        activation: str = "none",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if activation not in kernels.ACTIVATIONS:
            raise ValueError(f"activation must be one of {kernels.ACTIVATIONS}, got {activation!r}")
        if act not in ACT_MODES:
            raise ValueError(f"act must be one of {ACT_MODES}, got {act!r}")
        if act == "dynamic" and n_groups != 1:
            raise ValueError("timestep groups need static activation scales (act='static')")
        self.in_features = in_features
        self.out_features = out_features
        self.act = act
        self.n_groups = n_groups
        # Applied after the bias inside the GEMM epilogue (set by fuse_feedforwards; not state).
        self.activation = activation
        kw: dict[str, Any] = {"device": device}
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, **kw))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, **kw))
        self.register_buffer(
            "bias", torch.empty(out_features, dtype=torch.float32, **kw) if bias else None
        )
        self.register_buffer(
            "act_scale",
            torch.empty(n_groups, dtype=torch.float32, **kw) if act == "static" else None,
        )
        self.register_buffer(
            "smooth", torch.empty(in_features, dtype=torch.float32, **kw) if smooth else None
        )
        self.context: TimestepContext | None = None
        self._derived: dict[str, Any] | None = None
        self._dense: bool | None = None  # run dequantised (w8a8_dense; decided at first call)
        self._dense_w: tuple | None = None  # w8a8_dense.weight: (key, weight)
        self._derived_key: list | None = None  # weight_cache.stamp of the buffers

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        act: str = "dynamic",
        act_scale: torch.Tensor | float | Iterable[float] | None = None,
        smooth: torch.Tensor | None = None,
    ) -> W8A8Linear:
        """Quantise ``linear``'s weight symmetrically per output channel (round to nearest).

        Args:
            linear: the layer to replace.
            act: "dynamic" (per-token scales at run time) or "static" (``act_scale``).
            act_scale: static activation scale(s) (one, or one per timestep group), i.e. the
                calibrated abs-max / 127 of the (smoothed) input.
            smooth: optional per-input-channel balancing factors s (SmoothQuant): the weight is
                multiplied by s before quantisation and the input divided by s at run time.
        """
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w * smooth.detach().float().to(w.device)
        scale = (w.abs().amax(dim=1) / kernels.QMAX).clamp_min(1e-12)
        codes = torch.round(w / scale[:, None]).clamp(-kernels.QMAX, kernels.QMAX).to(torch.int8)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_int8(codes, scale, bias, act=act, act_scale=act_scale, smooth=smooth)

    @classmethod
    def from_int8(
        cls,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        act: str = "dynamic",
        act_scale: torch.Tensor | float | Iterable[float] | None = None,
        smooth: torch.Tensor | None = None,
    ) -> W8A8Linear:
        """From ready int8 codes [out, in] and fp32 scales [out] (e.g. after GPTQ)."""
        out_f, in_f = weight.shape
        scales = None
        if act == "static":
            if act_scale is None:
                raise ValueError("act='static' needs act_scale (from calibration)")
            scales = torch.as_tensor(
                act_scale if not isinstance(act_scale, torch.Tensor) else act_scale.detach(),
                dtype=torch.float32,
            ).reshape(-1)
            if not bool(torch.all(scales > 0)):
                raise ValueError("activation scales must be positive")
        elif act_scale is not None:
            raise ValueError("act_scale is only used with act='static'")
        dev = weight.device
        m = cls(
            in_f, out_f, bias is not None, act, n_groups=1 if scales is None else scales.numel(),
            smooth=smooth is not None, device=dev,
        )
        m.weight.copy_(weight.to(torch.int8))
        m.weight_scale.copy_(weight_scale.detach().float().reshape(-1))
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        if scales is not None:
            m.act_scale.copy_(scales)
        if smooth is not None:
            m.smooth.copy_(smooth.detach().float())
        return m

    # -- derived kernel state ---------------------------------------------------------------

    def _state(self) -> tuple:
        b = self._buffers  # (plain dict reads: this runs twice per forward)
        return b["weight"], b["weight_scale"], b["bias"], b["act_scale"], b["smooth"]

    def prepare(self) -> dict[str, Any]:
        """Build (or return) the packed weight and reciprocal scales for the current buffers."""
        if self._derived is not None and torch.compiler.is_compiling():
            return self._derived  # data_ptr() cannot be traced; prepare() ran before compiling
        state = self._state()
        if self._derived is not None and weight_cache.unchanged(self._derived_key, state):
            return self._derived
        key = weight_cache.stamp(state)
        inv_smooth = torch.reciprocal(self.smooth) if self.smooth is not None else None
        d: dict[str, Any] = {
            "packed": kernels.prepack_int8(self.weight),
            "w_zero": torch.zeros(self.out_features, dtype=torch.int64, device=self.weight.device),
            "inv_smooth": inv_smooth,
        }
        if self.act == "static":
            inv = torch.reciprocal(self.act_scale)
            # The smoothing vector folds into the static multiplier: one multiply per element.
            d["x_scale"] = [float(s) for s in self.act_scale.tolist()]
            d["x_inv"] = [inv[g] if inv_smooth is None else inv_smooth * inv[g]
                          for g in range(self.n_groups)]
        self._derived, self._derived_key = d, key
        return d

    def release(self) -> None:
        """Drop the packed weight (e.g. before saving memory); rebuilt at the next forward."""
        self._derived = self._derived_key = None
        self._dense_w = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        # model.to(torch.bfloat16) must move our fp32 scales, never round them: take the new
        # device from fn and move the original tensor instead.
        changed = False
        for name, t in list(self._buffers.items()):
            if t is not None:
                moved = fn(t)
                new = moved if moved.dtype == t.dtype else t.to(moved.device)
                changed |= new is not t
                self._buffers[name] = new
        if changed:  # a no-op .to() keeps the packed weight (prepared at load, for compiling)
            self.release()
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.release()

    def input_scale(self) -> float:
        """The static input scale in force (current timestep group)."""
        return self.prepare()["x_scale"][self._group()]

    def _group(self) -> int:
        if self.n_groups == 1:
            return 0
        ctx = self.context
        if ctx is None or ctx.group is None:
            raise RuntimeError(
                "W8A8Linear has per-timestep activation scales but no timestep was set; call "
                "compress.modules.w8a8.attach_timestep_context(transformer, ctx) first"
            )
        return ctx.group

    # -- forward ------------------------------------------------------------------------------

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float | torch.Tensor]:
        """x [..., in] -> (int8 codes [M, in], per-tensor float scale or per-token [M, 1])."""
        d = self.prepare()
        x2 = x.reshape(-1, self.in_features)
        use_cache = not torch.compiler.is_compiling()
        if self.act == "static" and self.n_groups > 1 and torch.compiler.is_compiling():
            # the timestep's group is a tensor here: scales gathered, rescaled after the GEMM
            scale = self.act_scale.index_select(0, self.context.group_t.reshape(1))
            inv = torch.reciprocal(scale)
            if d["inv_smooth"] is not None:
                inv = d["inv_smooth"] * inv
            return kernels.quantize_static(x2, inv), scale
        if self.act == "static":
            g = self._group()
            key: tuple = ("static", d["x_scale"][g], self.smooth)
            xq = _cached(x, key) if use_cache else None
            if xq is None:
                xq = kernels.quantize_static(x2, d["x_inv"][g])
                if use_cache:
                    _store(x, key, xq)
            return xq, d["x_scale"][g]
        key = ("dynamic", self.smooth)
        hit = _cached(x, key) if use_cache else None
        if hit is None:
            hit = kernels.quantize_per_token(x2, d["inv_smooth"])
            if use_cache:
                _store(x, key, hit)
        return hit

    def matmul_codes(
        self,
        xq: torch.Tensor,
        x_scale: float | torch.Tensor,
        out_dtype: torch.dtype,
        out_scale: float | None = None,
        activation: str | None = None,
        addend: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """int8 codes [M, in] (from :meth:`quantize_input`) -> act(x W^T + b + addend) [M, out].

        ``out_scale``: return int8 codes on that scale instead (static inputs only).
        ``activation``: instead of the layer's own. ``addend`` [M, out]: added before the
        activation (a LoRA side branch), in the rescale pass where there is one.
        """
        act = self.activation if activation is None else activation
        d = self.prepare()
        if addend is not None and out_scale is not None:
            raise ValueError("matmul_codes: an addend needs a floating-point output")
        if addend is not None and isinstance(x_scale, float):  # static: oneDNN's epilogue
            y = self.matmul_codes(xq, x_scale, torch.float32, activation="none")
            return kernels.apply_activation(y + addend.float(), act).to(out_dtype)
        if isinstance(x_scale, float):
            return kernels.int8_linear(
                xq, x_scale, self.weight, d["packed"], self.weight_scale, d["w_zero"], self.bias,
                out_dtype, act, out_scale,
            )
        if out_scale is not None:
            raise ValueError("int8 hand-over needs a static input scale")
        acc, col = self._dynamic_acc(xq, d, out_dtype)
        return kernels.rescale_rows(acc, x_scale, self.bias, out_dtype, act, col, addend)

    def _dynamic_acc(self, xq: torch.Tensor, d: dict[str, Any],
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The GEMM of per-token codes before their rescale pass: (accumulators, the weight
        scales that pass must still apply, or None when the accumulators hold them)."""
        if d["packed"] is None and xq.device.type == "cpu":
            # torch._int_mm's int32 accumulators: row scale, weight scales, bias and the
            # activation in one fused pass to the output dtype
            return torch._int_mm(xq, self.weight.t()), self.weight_scale
        # Per-token scales differ per row, which oneDNN's epilogue cannot apply; its output
        # keeps the weight scales and one fused pass adds row scale, bias and activation.
        acc_dtype = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32
        return kernels.int8_linear(
            xq, 1.0, self.weight, d["packed"], self.weight_scale, d["w_zero"], None, acc_dtype
        ), None

    def matmul_requantize(self, xq: torch.Tensor, x_scale: torch.Tensor, nxt: W8A8Linear,
                          addend: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic int8 codes [M, in] of a bf16 input -> the codes and per-token scales of
        ``nxt``'s input, act(x W^T + b [+ addend]) quantised for it in the GEMM's rescale
        pass (``addend`` [M, out]: a LoRA side branch)."""
        acc, col = self._dynamic_acc(xq, self.prepare(), torch.bfloat16)
        return kernels.rescale_quantize(acc, x_scale, self.bias, self.activation, col,
                                        nxt.prepare()["inv_smooth"], addend)

    def forward(self, x: torch.Tensor, activation: str | None = None,
                addend: torch.Tensor | None = None) -> torch.Tensor:
        """``addend`` [..., out] joins the result before the activation (a LoRA side branch:
        in the rescale pass, so the branch costs no extra pass over the output)."""
        act = self.activation if activation is None else activation
        if w8a8_dense.use_dense(self, x):
            if addend is None:
                return w8a8_dense.forward(self, x, act)
            y = w8a8_dense.forward(self, x, "none")
            return kernels.apply_activation(y + addend.view_as(y).to(y.dtype), act)
        xq, x_scale = self.quantize_input(x)
        if addend is not None:
            addend = addend.reshape(-1, self.out_features)
        y = self.matmul_codes(xq, x_scale, x.dtype, activation=activation, addend=addend)
        return y.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same quantisation simulated in fp32 with dequantised tensors (for tests)."""
        d = self.prepare()
        x2 = x.reshape(-1, self.in_features)
        if self.act == "static":
            g = self._group()
            xq = kernels.quantize_static.__wrapped__(x2, d["x_inv"][g])
            xd = xq.float() * d["x_scale"][g]
        else:
            xq, row_scale = kernels.quantize_per_token.__wrapped__(x2, d["inv_smooth"])
            xd = xq.float() * row_scale
        w = self.weight.float() * self.weight_scale[:, None]
        y = xd @ w.t()
        if self.bias is not None:
            y = y + self.bias
        y = kernels.apply_activation(y, self.activation)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Effective weight in the input's original basis (smoothing undone)."""
        w = self.weight.float() * self.weight_scale[:, None]
        if self.smooth is not None:
            w = w / self.smooth
        return w.to(dtype)

    def extra_repr(self) -> str:
        g = f", groups={self.n_groups}" if self.n_groups > 1 else ""
        s = ", smooth" if self.smooth is not None else ""
        a = f", activation={self.activation}" if self.activation != "none" else ""
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"act={self.act}{g}{s}{a}"
        )


# ---------------------------------------------------------------------------------------------
# feed-forward fusion (diffusers FeedForward: GELU(proj) -> Dropout -> Linear [-> Dropout])


class _FusedGELU(nn.Module):
    """Stands where diffusers' GELU was; its W8A8 ``proj`` applies the GELU in the GEMM."""

    def __init__(self, proj: W8A8Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class W8A8FeedForward(nn.Module):
    """A diffusers FeedForward whose two projections are W8A8Linear, fused further.

    The GELU runs inside the first GEMM (oneDNN post-op for static inputs, the per-token
    rescale pass for dynamic ones); when both projections are static the first GEMM writes int8
    codes on the second's input scale, and when both are dynamic (bf16 on CPU) the first
    GEMM's rescale pass quantises per token for the second, so the 4x-wide hidden activation
    is never written in bf16 nor read back to be quantised. State-dict keys stay those of the
    original module (``net.0.proj.*``, ``net.2.*``); inference only (dropouts are identities in
    eval).
    """

    def __init__(self, proj: W8A8Linear, out: W8A8Linear) -> None:
        super().__init__()
        self.net = nn.ModuleList([_FusedGELU(proj), nn.Identity(), out])

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        proj_l, out_l = self.net[0].proj, self.net[2]
        proj, out = _lora_base(proj_l, False), _lora_base(out_l, True)
        lora = proj is not proj_l or out is not out_l
        if not (isinstance(proj, W8A8Linear) and isinstance(out, W8A8Linear)):
            # a LoRA wrapper in a state other than base + side branch (merged, disabled):
            # each layer runs on its own (the wrapper adds its branch before the GELU)
            return out_l(proj_l(hidden_states))
        if lora and torch.is_grad_enabled():  # the branches below accumulate in place
            return out_l(proj_l(hidden_states))
        if (not lora and proj.act == "static" and out.act == "static"
                and self._fusable(proj, out, hidden_states)):
            xq, xs = proj.quantize_input(hidden_states)
            codes = proj.matmul_codes(xq, xs, hidden_states.dtype, out_scale=out.input_scale())
            y = out.matmul_codes(codes, out.input_scale(), hidden_states.dtype)
        elif self._dynamic_handover(proj, out, hidden_states):
            # per-token hand-over: the hidden activation goes from the first GEMM's rescale
            # pass straight to the second GEMM's int8 codes; LoRA side branches ride along
            # (the first layer's joins its rescale pass before the GELU, the second's
            # down-projection runs on the hidden codes)
            xq, xs = proj.quantize_input(hidden_states)
            addend = (proj_l._side_branch(hidden_states, None) if proj_l is not proj else None)
            if addend is not None:
                addend = addend.reshape(-1, proj.out_features)
            codes, cs = proj.matmul_requantize(xq, xs, out, addend)
            y = out.matmul_codes(codes, cs, hidden_states.dtype)
            if out_l is not out:
                y = out_l.branch_on_codes(codes, cs, y)
        else:
            y = out_l(proj_l(hidden_states))
        return y.view(*hidden_states.shape[:-1], out.out_features)

    @classmethod
    def _dynamic_handover(cls, proj: W8A8Linear, out: W8A8Linear, x: torch.Tensor) -> bool:
        """Whether the per-token hand-over applies (both dynamic, bf16 on CPU, eager)."""
        return (proj.act == "dynamic" and out.act == "dynamic" and x.device.type == "cpu"
                and x.dtype == torch.bfloat16 and not torch.compiler.is_compiling()
                and cls._fusable(proj, out, x))

    @staticmethod
    def _fusable(proj: W8A8Linear, out: W8A8Linear, x: torch.Tensor) -> bool:
        """Whether the static int8 hand-over applies: neither layer runs dequantised (small
        layers, w8a8_dense), and no timestep-group scale is a traced tensor (torch.compile)."""
        if (proj.n_groups > 1 or out.n_groups > 1) and torch.compiler.is_compiling():
            return False
        tokens = x.numel() // proj.in_features
        return not (w8a8_dense.use_dense(proj, x) or w8a8_dense.use_dense_for(out, tokens, x))

    @torch.no_grad()
    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        proj: W8A8Linear = self.net[0].proj
        out: W8A8Linear = self.net[2]
        h = proj.reference_forward(x.float())
        if proj.act == "static" and out.act == "static":
            s = out.input_scale()
            h = (h / s).round().clamp(-128, 127) * s  # the int8 hand-over
        return out.reference_forward(h).to(x.dtype)


def _lora_base(m: nn.Module, on_codes: bool) -> nn.Module:
    """The W8A8 layer under a LoRA wrapper that runs as base + side branch (else ``m``);
    ``on_codes``: the branch must also run on int8 input codes (no adapter dropout)."""
    base = getattr(m, "base_layer", None)
    if not (isinstance(base, W8A8Linear) and hasattr(m, "branch_on_codes") and m.plain()
            and (not on_codes or m.branch_on_codes_ok())):
        return m
    from compress.lora import int8_down

    return base if int8_down.int8_faster() else m


def _gelu_mode(m: nn.Module) -> str | None:
    # diffusers.models.activations.GELU: a Linear `proj` then F.gelu(approximate=...).
    if type(m).__name__ != "GELU" or not hasattr(m, "proj") or not hasattr(m, "approximate"):
        return None
    return {"tanh": "gelu_tanh", "none": "gelu"}.get(m.approximate)


def fuse_feedforwards(root: nn.Module) -> list[str]:
    """Replace every fusable diffusers FeedForward under ``root`` by a W8A8FeedForward.

    Fusable: ``net`` is [GELU with a W8A8Linear proj, Dropout, W8A8Linear] (optionally a final
    Dropout). Returns the qualified names replaced; the loader must call this again after
    restoring the W8A8 layers (fused and unfused outputs differ in rounding).
    """
    done = []
    for name, m in list(root.named_modules()):
        net = getattr(m, "net", None)
        if type(m).__name__ != "FeedForward" or not isinstance(net, nn.ModuleList):
            continue
        mods = list(net)
        if len(mods) not in (3, 4) or not all(isinstance(d, nn.Dropout) for d in mods[1::2]):
            continue
        mode = _gelu_mode(mods[0])
        if mode is None or not isinstance(mods[0].proj, W8A8Linear):
            continue
        if not isinstance(mods[2], W8A8Linear) or mods[0].proj.activation != "none":
            continue
        mods[0].proj.activation = mode
        fused_ff = W8A8FeedForward(mods[0].proj, mods[2])
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, fused_ff)
        done.append(name)
    return done
