"""Recipes: YAML -> validated models, command-line overrides, and a stable hash."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from compress.config import MAX_COUNT, MAX_SEED, MAX_STEPS, StrictModel, unique
from compress.errors import UserError
from compress.models.spec import ModelSpec
from compress.registry import all_passes

Strict = StrictModel  # every recipe section: unknown keys refused, numbers finite, no coercion
_SIDE = {"ge": 16, "le": 4096, "multiple_of": 8}  # image side in pixels (latents are 8x down)


class CalibrationConfig(Strict):
    """How calibration inputs are captured from the real pipeline."""

    prompts: str = Field("auto", min_length=1,
                         description="prompt file, 'auto' (demo captions / general prompts) or "
                         "'random' (zero-data: random words from the tokenizer's vocabulary)")
    num_prompts: int = Field(8, ge=1, le=MAX_COUNT, description="how many prompts from the file")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                              description="denoising steps (None: family default)")
    capture_steps: list[int] | None = Field(
        None, min_length=1, description="step indices to keep, each in [0, steps) (None: all)")
    guidance: float | None = Field(None, ge=0, le=100,
                                   description="guidance scale (None: family default)")
    resolution: int | None = Field(None, **_SIDE, description="image side in px (None: default)")
    seed: int = Field(0, ge=0, le=MAX_SEED,
                      description="seed of the first prompt; prompt i uses seed + i")

    @model_validator(mode="after")
    def _steps(self) -> CalibrationConfig:
        cs = self.capture_steps
        if cs is not None:
            unique(cs, "capture_steps")
            top = self.steps if self.steps is not None else MAX_STEPS
            bad = [i for i in cs if not 0 <= i < top]
            if bad:
                raise ValueError(f"capture_steps {bad}: step indices run from 0 to steps - 1 "
                                 f"({top - 1})")
        if self.seed + self.num_prompts - 1 > MAX_SEED:
            raise ValueError(f"seed + num_prompts exceeds {MAX_SEED}")
        return self


class EvalConfig(Strict):
    """How the compressed pipeline is compared with the original."""

    enabled: bool = True
    prompts: str = Field("auto", min_length=1,
                         description="prompt file, or 'auto' (held-out demo captions)")
    num_prompts: int = Field(16, ge=1, le=MAX_COUNT)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance: float | None = Field(None, ge=0, le=100)
    resolution: int | None = Field(None, **_SIDE)
    seed: int = Field(1000, ge=0, le=MAX_SEED, description="seed of the first eval prompt")
    latency: bool = Field(True, description="time one denoising step, original and compressed")
    latency_repeats: int = Field(5, ge=1, le=1000)

    @model_validator(mode="after")
    def _seeds(self) -> EvalConfig:
        if self.seed + self.num_prompts - 1 > MAX_SEED:
            raise ValueError(f"seed + num_prompts exceeds {MAX_SEED}")
        return self


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

    name: str = Field(min_length=1, pattern=r"\S")
    description: str = ""
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    passes: list[dict[str, Any]] = Field(default_factory=list)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    gates: dict[str, str | float] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    model: ModelSpec | None = Field(None, description="blocks/roles of a user's own module")

    @field_validator("gates")
    @classmethod
    def _check_gates(cls, v: dict[str, str | float]) -> dict[str, str | float]:
        for k, expr in v.items():
            if k not in KNOWN_FIGURES:
                raise ValueError(f"gate {k!r}: no such figure (known: {', '.join(KNOWN_FIGURES)})")
            try:
                _, thr = parse_gate(expr)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"gate {k!r}: {expr!r} is not like '>= 30' or "
                                 f"'<= 0.01 {OPTIONAL}'") from exc
            if not math.isfinite(thr):
                raise ValueError(f"gate {k!r}: the threshold must be a finite number")
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
            msg = " ".join(str(err["msg"]).split())  # one line, whatever value it quotes
            if len(msg) > 300:  # a huge value echoed back is no help
                msg = msg[:240] + " ... " + msg[-40:]
            msgs.append(f"{where}: '{loc}': {msg}")
    return "; ".join(msgs[:5]) + " (see README: Recipe keys)"


def validate(raw: Any, where: str = "<recipe>") -> Recipe:
    """Validate raw recipe data; UserError naming the key and the file on any problem."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a recipe must be a YAML mapping with name, passes, ...")
    raw = dict(raw)
    if isinstance(raw.get("gates"), dict):  # `--set gates.NAME=null` removes that gate
        raw["gates"] = {k: v for k, v in raw["gates"].items() if v is not None}
    passes_raw = raw.get("passes")
    if not isinstance(passes_raw, list) or not passes_raw:
        raise UserError(f"{where}: 'passes' must be a non-empty list of {{pass_name: config}} "
                        "entries, e.g. [{ptq: {weights: {bits: 8}}}]")
    registry = all_passes()
    parsed: list[dict[str, Any]] = []
    for i, entry in enumerate(passes_raw):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise UserError(f"{where}: 'passes.{i}' must be one {{pass_name: config}} mapping, "
                            "e.g. {ptq: {}}")
        (name, cfg_raw), = entry.items()
        if cfg_raw is not None and not isinstance(cfg_raw, dict):
            raise UserError(f"{where}: 'passes.{i}.{name}' must be a mapping of settings "
                            "(or empty for the defaults)")
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
    """Structural and training passes first, then storage-format passes (ptq, vq). Several
    format passes may follow each other: each one takes only the layers still in full
    precision (e.g. vq on the feed-forward layers, then ptq on attention)."""
    registry = all_passes()
    seen_format = None
    for i, (name, _) in enumerate(recipe.pass_specs()):
        kind = registry[name].kind
        if kind == "format":
            seen_format = seen_format or name
        elif seen_format is not None:
            raise UserError(
                f"{where}: 'passes.{i}': '{name}' changes the model after '{seen_format}' "
                "quantized it; put structural and training passes before ptq/vq"
            )
    names = [n for n, _ in recipe.pass_specs()]
    if "route_blocks" in names:
        later = [n for n in names[names.index("route_blocks") + 1:]
                 if n in ("prune_depth", "prune_width", "to_moe", "route_blocks")]
        if later:
            raise UserError(f"{where}: '{later[0]}' after 'route_blocks': routed groups must "
                            "keep their blocks and layers; put it before route_blocks")


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; a megabyte is not a recipe
MAX_DEPTH = 32  # nesting levels of mappings and lists
MAX_VALUES = 20_000  # values after aliases are expanded (an alias bomb is a few lines of YAML)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (the last one would silently win)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise UserError(f"duplicate key {key!r} (line {line}): give each key once")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _depth(node: yaml.Node) -> int:
    """Nesting depth of a composed YAML node (iterative: no recursion on hostile input);
    UserError when aliases expand it beyond MAX_VALUES values."""
    best, stack, seen = 0, [(node, 1)], 0
    while stack:
        n, d = stack.pop()
        best = max(best, d)
        seen += 1
        if seen > MAX_VALUES:
            raise UserError(f"more than {MAX_VALUES} values once its aliases (*name) are "
                            "expanded: not a recipe")
        if d > MAX_DEPTH:
            return d
        if isinstance(n, yaml.MappingNode):
            stack.extend((v, d + 1) for pair in n.value for v in pair)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend((v, d + 1) for v in n.value)
    return best


def _flow_depth_exceeds(text: str) -> bool:
    """Whether ``[``/``{`` nest beyond MAX_DEPTH outside quotes and comments: a linear scan
    before the YAML parser, which takes seconds on thousands of open brackets. A quote opens
    only where a YAML scalar can start (so ``don't`` is no quote). It may count less than the
    parser sees (the depth check on the parsed nodes follows), never more."""
    depth, quote, comment, prev = 0, "", False, "\n"
    for ch in text:
        if ch == "\n":
            comment, quote = False, ""  # quoted recipe values stay on one line
        elif comment:
            pass
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"" and prev in " \t\n[{,:":
            quote = ch
        elif ch == "#" and prev in " \t\n":
            comment = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif ch in "]}":
            depth = max(0, depth - 1)
        prev = ch
    return False


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> data, strictly: one document, no duplicate keys, at most MAX_DEPTH levels;
    every problem is one UserError naming ``where`` (a file, or a --set key)."""
    if _flow_depth_exceeds(text):
        raise UserError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    try:
        loader = _StrictLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if _depth(node) > MAX_DEPTH:
                raise UserError(f"{where}: nested more than {MAX_DEPTH} levels deep")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except UserError as exc:
        msg = str(exc)
        raise UserError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}{line}: not valid YAML ({problem})") from None
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to read") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str], where: str) -> dict[str, Any]:
    """Apply ``a.b.0.c=value`` overrides (values parsed as YAML) to raw recipe data."""
    for ov in overrides:
        if "=" not in ov:
            raise UserError(f"--set {ov!r}: expected KEY=VALUE, e.g. passes.0.ptq.weights.bits=6")
        key, text = ov.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise UserError(f"--set {ov!r}: KEY is a dotted path such as passes.0.ptq.weights.bits")
        val = parse_yaml(text, f"--set {key.strip()}") if text.strip() else None
        node: Any = raw
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {key}: '{'.'.join(parts[: j + 1])}' is not a list index in {where}")
                if last:
                    node[int(part)] = val
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = val
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
    with open(p, "rb") as f:
        data = f.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:
        raise UserError(f"recipe {p}: larger than {MAX_RECIPE_BYTES >> 10} KiB: not a recipe")
    if b"\0" in data:
        raise UserError(f"recipe {p}: a binary file, not a YAML recipe")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"recipe {p}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
                        ) from None
    raw = parse_yaml(text, f"recipe {p}")
    if raw is None:
        raise UserError(f"recipe {p}: the file is empty")
    if isinstance(raw, dict) and overrides:
        raw = apply_overrides(raw, overrides, str(p))
    return validate(raw, str(p))
