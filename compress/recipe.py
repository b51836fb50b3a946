"""Recipes: YAML -> validated models, command-line overrides, and a stable hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compress.errors import UserError
from compress.models.spec import ModelSpec
from compress.registry import all_passes


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationConfig(Strict):
    """How calibration inputs are captured from the real pipeline."""

    prompts: str = Field("auto", description="prompt file, or 'auto' (demo captions / general prompts)")
    num_prompts: int = Field(8, ge=1, description="how many prompts from the file")
    steps: int | None = Field(None, ge=1, description="denoising steps (None: family default)")
    capture_steps: list[int] | None = Field(None, description="step indices to keep (None: all)")
    guidance: float | None = Field(None, description="guidance scale (None: family default)")
    resolution: int | None = Field(None, ge=8, description="image side in px (None: default)")
    seed: int = Field(0, description="seed of the first prompt; prompt i uses seed + i")


class EvalConfig(Strict):
    """How the compressed pipeline is compared with the original."""

    enabled: bool = True
    prompts: str = Field("auto", description="prompt file, or 'auto' (held-out demo captions)")
    num_prompts: int = Field(16, ge=1)
    steps: int | None = Field(None, ge=1)
    guidance: float | None = None
    resolution: int | None = Field(None, ge=8)
    seed: int = Field(1000, description="seed of the first eval prompt")
    latency: bool = Field(True, description="time one denoising step, original and compressed")
    latency_repeats: int = Field(5, ge=1)


_OPS = (">=", "<=", ">", "<", "==")
OPTIONAL = "if measured"  # a gate ending so is skipped ("not measured") where its figure is not
# every figure a gate may name: the report's numbers plus two derived ones
FIGURES = {
    "quality": ("psnr_vs_teacher", "ssim_vs_teacher", "frechet_vs_teacher", "prompt_accuracy",
                "teacher_prompt_accuracy", "prompt_accuracy_drop"),
    "size": ("params_total", "params_active", "bytes", "bits_per_weight", "compression_ratio"),
    "speed": ("latency_ms_per_step", "baseline_latency_ms_per_step", "peak_rss_mb", "speedup"),
}
KNOWN_FIGURES = tuple(f for fs in FIGURES.values() for f in fs)


def gate_optional(expr: str | float) -> bool:
    """Whether a gate is marked ``... if measured``."""
    return isinstance(expr, str) and expr.strip().endswith(OPTIONAL)


def parse_gate(expr: str | float) -> tuple[str, float]:
    """'>= 30' -> ('>=', 30.0). A bare number means '>='; a trailing 'if measured' is dropped."""
    if isinstance(expr, (int, float)):
        return ">=", float(expr)
    s = str(expr).strip()
    if s.endswith(OPTIONAL):
        s = s[: -len(OPTIONAL)].strip()
    for op in _OPS:
        if s.startswith(op):
            return op, float(s[len(op) :].strip())
    return ">=", float(s)


def gate_passes(op: str, value: float | None, threshold: float) -> bool:
    if value is None:
        return False
    return {
        ">=": value >= threshold,
        "<=": value <= threshold,
        ">": value > threshold,
        "<": value < threshold,
        "==": value == threshold,
    }[op]


class Recipe(Strict):
    """A named, ordered list of passes plus calibration, evaluation and quality gates."""

    name: str
    description: str = ""
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    passes: list[dict[str, Any]] = Field(default_factory=list)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    gates: dict[str, str | float] = Field(default_factory=dict)
    seed: int = 0
    model: ModelSpec | None = Field(None, description="blocks/roles of a user's own module")

    @field_validator("gates")
    @classmethod
    def _check_gates(cls, v: dict[str, str | float]) -> dict[str, str | float]:
        for k, expr in v.items():
            if k not in KNOWN_FIGURES:
                raise ValueError(f"gate {k!r}: no such figure (known: {', '.join(KNOWN_FIGURES)})")
            try:
                parse_gate(expr)
            except ValueError as exc:
                raise ValueError(f"gate {k!r}: {expr!r} is not like '>= 30' or "
                                 f"'<= 0.01 {OPTIONAL}'") from exc
        return v

    def pass_specs(self) -> list[tuple[str, BaseModel]]:
        """(name, validated config) for every pass, in order."""
        out = []
        for entry in self.passes:
            (name, cfg), = entry.items()
            out.append((name, cfg))
        return out

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in, as plain JSON-able data."""
        d = self.model_dump(mode="json")
        d["passes"] = [{n: c.model_dump(mode="json")} for n, c in self.pass_specs()]
        return d

    def hash(self) -> str:
        blob = json.dumps(self.resolved(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _fmt_errors(exc: ValidationError, prefix: tuple, where: str) -> str:
    msgs = []
    for err in exc.errors():
        loc = _loc(prefix + tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            msgs.append(f"{where}: unknown key '{loc}'")
        else:
            msgs.append(f"{where}: '{loc}': {err['msg']}")
    return "; ".join(msgs) + " (see README: Recipe keys)"


def validate(raw: Any, where: str = "<recipe>") -> Recipe:
    """Validate raw recipe data; UserError naming the key and the file on any problem."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a recipe must be a YAML mapping with name, passes, ...")
    raw = dict(raw)
    passes_raw = raw.get("passes") or []
    if not isinstance(passes_raw, list):
        raise UserError(f"{where}: 'passes' must be a list of {{pass_name: config}} entries")
    registry = all_passes()
    parsed: list[dict[str, Any]] = []
    for i, entry in enumerate(passes_raw):
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise UserError(f"{where}: 'passes.{i}' must be one {{pass_name: config}} mapping")
        (name, cfg_raw), = entry.items()
        if name not in registry:
            raise UserError(
                f"{where}: 'passes.{i}': unknown pass '{name}' (known: {', '.join(sorted(registry))})"
            )
        try:
            cfg = registry[name].config.model_validate(cfg_raw or {})
        except ValidationError as exc:
            raise UserError(_fmt_errors(exc, ("passes", i, name), where)) from None
        parsed.append({name: cfg})
    raw["passes"] = []
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_fmt_errors(exc, (), where)) from None
    recipe.passes = parsed
    _check_order(recipe, where)
    return recipe


def _check_order(recipe: Recipe, where: str) -> None:
    registry = all_passes()
    seen_format = None
    for i, (name, _) in enumerate(recipe.pass_specs()):
        kind = registry[name].kind
        if kind == "format":
            if seen_format is not None:
                raise UserError(
                    f"{where}: 'passes.{i}': '{name}' after '{seen_format}': one storage-format "
                    "pass (ptq or vq) per recipe"
                )
            seen_format = name
        elif seen_format is not None:
            raise UserError(
                f"{where}: 'passes.{i}': '{name}' changes the model after '{seen_format}' "
                "quantized it; put structural and training passes before ptq/vq"
            )


def apply_overrides(raw: dict[str, Any], overrides: list[str], where: str) -> dict[str, Any]:
    """Apply ``a.b.0.c=value`` overrides (values parsed as YAML) to raw recipe data."""
    for ov in overrides:
        if "=" not in ov:
            raise UserError(f"--set {ov!r}: expected KEY=VALUE, e.g. passes.0.ptq.weights.bits=6")
        key, val = ov.split("=", 1)
        parts = key.strip().split(".")
        node: Any = raw
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {key}: '{'.'.join(parts[: j + 1])}' is not a list index in {where}")
                if last:
                    node[int(part)] = yaml.safe_load(val)
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = yaml.safe_load(val)
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise UserError(f"--set {key}: '{'.'.join(parts[:j])}' is not a mapping in {where}")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply --set overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe {p}: no such file (see recipes/ for ready ones)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"recipe {p}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raise UserError(f"recipe {p}: the file is empty")
    if isinstance(raw, dict) and overrides:
        raw = apply_overrides(raw, overrides, str(p))
    return validate(raw, str(p))
