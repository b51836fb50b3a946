"""Fuzz: recipes mutated from the shipped ones, with a fixed seed, through load_recipe.

Every case is either accepted and valid by the documented rules (checked here, independently of
the recipe model), or refused with one UserError line naming the file or the --set key. Never
another exception, never a hang (each case runs under an alarm). Some mutations must always be
refused (NaN/inf, unknown keys, duplicate keys, nesting beyond MAX_DEPTH, alias bombs, a
missing name or passes); those are counted as such.
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal
from collections import Counter
from pathlib import Path

import pytest
import yaml

from compress.config import MAX_COUNT, MAX_SEED, MAX_TRAIN_STEPS
from compress.errors import UserError
from compress.recipe import KNOWN_FIGURES, MAX_DEPTH, load_recipe, parse_gate, validate
from compress.registry import all_passes

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))
CASES = 1200
SECONDS = 5  # per case; a refusal or an acceptance takes milliseconds


# ---- the documented rules (README, Recipe keys), checked on every accepted recipe ----------

def _numbers(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}.{i}")
    elif isinstance(x, int | float) and not isinstance(x, bool):
        yield path, x


def assert_valid(recipe) -> None:
    d = recipe.resolved()
    json.dumps(d, allow_nan=False)  # no NaN or inf anywhere
    for path, x in _numbers(d):
        assert math.isfinite(x), path
        if path.startswith(".gates."):
            continue  # a gate threshold is any finite figure (a drop of -0.5 is a gain)
        assert 0 <= x <= MAX_SEED, (path, x)  # nothing documented is negative or beyond a seed
        if path.startswith(".passes.") and ".distill." in path and path.rsplit(".", 1)[-1] in (
                "steps", "warmup", "checkpoint_every"):
            assert x <= MAX_TRAIN_STEPS, (path, x)  # training runs may be long
        elif not path.endswith("seed"):
            assert x <= MAX_COUNT, (path, x)
    assert d["name"].strip()
    assert d["passes"], "an empty pass list is refused"
    for entry in d["passes"]:
        (name, _), = entry.items()
        assert name in all_passes()
    cal = d["calibration"]
    if cal["capture_steps"] is not None:
        steps = cal["capture_steps"]
        assert steps and len(set(steps)) == len(steps)
        assert all(0 <= s < (cal["steps"] or 1000) for s in steps)
    for side in (cal["resolution"], d["eval"].get("resolution")):
        assert side is None or (side % 8 == 0 and 16 <= side <= 4096)
    for fig, expr in d["gates"].items():
        assert fig in KNOWN_FIGURES
        assert math.isfinite(parse_gate(expr)[1])
    for entry in d["passes"]:
        cfg = entry.get("ptq")
        if cfg is None:
            continue
        assert cfg["weights"]["bits"] in (2, 3, 4, 5, 6, 8)
        assert cfg["include"], "include: [] selects nothing"
        if cfg["smoothing"] and cfg["smoothing"]["alpha"] != "auto":
            assert 0 <= cfg["smoothing"]["alpha"] <= 1
        if cfg["gptq"]:
            assert 0 < cfg["gptq"]["damp"] <= 1
        mp = cfg["mixed_precision"]
        if mp:
            assert mp["candidates"] and mp["metrics"]
            if mp["size_of"] is None:
                assert min(mp["candidates"]) <= mp["avg_bits"] <= 16
            else:  # the budget is a GGUF file's size, measured on the model
                assert mp["avg_bits"] is None
    # a valid recipe's own resolved form is valid and means the same
    assert validate(d).hash() == recipe.hash()


# ---- mutations ---------------------------------------------------------------------------

def _paths(x, path=()):
    yield path, x
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, (*path, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _paths(v, (*path, i))


def _set(x, path, value):
    node = x
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _delete(x, path):
    node = x
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]


ODD_VALUES = [None, True, False, 0, -1, 1, 2, 3, 7, 8.0, 0.5, -0.0, 1e-300, 10**6, 10**9, 10**12,
              2**63, 2**64, -(10**9), "", " ", "8", "auto", "re:(", "re:.*", "attn_qvk", [], [1],
              ["x"], {}, {"bits": 8}, "é", "🙂" * 40, "\u202e", "\u200b", "x" * 5000]
UNICODE = ["naïve", "日本語", "🙂", "\u202eevil", "\u200b", "a\u0301", "Ω≈ç√", "\ufeffname"]
NONFINITE = [float("nan"), float("inf"), float("-inf")]


def mutate(rng: random.Random, base: dict, text: str) -> tuple[str, str | bytes, bool, list]:
    """(kind, recipe text or bytes, must be refused, --set overrides)."""
    data = copy.deepcopy(base)
    paths = [p for p, _ in _paths(data) if p]
    kind = rng.choice(["delete", "type", "nonfinite", "huge", "unknown", "unicode", "deep",
                       "alias", "bomb", "duplicate", "garbage", "truncate", "set", "set_bad"])
    must = False
    sets: list[str] = []
    if kind == "delete":
        p = rng.choice(paths)
        _delete(data, p)
        must = p in (("name",), ("passes",)) or (len(p) == 2 and p[0] == "passes"
                                                 and len(base["passes"]) == 1)
    elif kind == "type":
        _set(data, rng.choice(paths), copy.deepcopy(rng.choice(ODD_VALUES)))
    elif kind == "nonfinite":
        nums = [p for p, v in _paths(data) if p and isinstance(v, int | float)
                and not isinstance(v, bool)]
        p = rng.choice(nums or paths)
        _set(data, p, rng.choice(NONFINITE))
        must = True
    elif kind == "huge":
        _set(data, rng.choice(paths), rng.choice([10**k for k in range(6, 40, 3)]
                                                  + [-(10**k) for k in range(0, 20, 4)]))
    elif kind == "unknown":
        maps = [p for p, v in _paths(data) if isinstance(v, dict)
                and "overrides" not in p and "gates" not in p]
        node = data
        for q in rng.choice(maps):
            node = node[q]
        node[f"zz_{rng.randrange(10**6)}"] = rng.choice(ODD_VALUES[:8])
        must = True
    elif kind == "unicode":
        p = rng.choice(paths)
        _set(data, p, rng.choice(UNICODE) + str(rng.randrange(100)))
    elif kind == "deep":
        n = rng.choice([MAX_DEPTH + 1, 100, 1000, 5000])
        must = True
        if n > 100:  # yaml.dump would recurse itself: write the nesting as flow text
            return kind, text + f"\nextra: {'[' * n}1{']' * n}\n", must, []
        value: object = 8
        for _ in range(n):
            value = [value] if rng.random() < 0.5 else {"k": value}
        _set(data, rng.choice(paths), value)
    if kind in ("delete", "type", "nonfinite", "huge", "unknown", "unicode", "deep", "set",
                "set_bad"):
        body = _dump(data)
        if kind == "set":
            key = ".".join(str(q) for q in rng.choice(paths))
            sets = [f"{key}={rng.choice(['8', '4', '-1', '1e9', '.nan', 'true', '[]', '{}', 'x', ''])}"]
        if kind == "set_bad":
            sets = [rng.choice(["passes.0.ptq.weights.bits=[", "gates.x=>= 30",
                                "a..b=1", "nokey", "passes.9.ptq=1", "name.x=1",
                                "passes.0.ptq.include=[attn_qvk", "seed=*x", "seed=&a 1",
                                "calibration=" + "[" * 500])]
        return kind, body, must, sets
    if kind == "alias":
        body = text + "\n_extra_a: &anchor {bits: 8}\n_extra_b: *anchor\n"
        return kind, body, True, []  # two unknown top-level keys
    if kind == "bomb":
        lines = ['l0: &l0 ["x","x","x","x","x","x","x","x","x","x"]']
        for i in range(1, rng.choice([4, 6, 9])):
            lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]")
        return kind, text + "\n" + "\n".join(lines) + "\n", True, []
    if kind == "duplicate":
        top = [ln for ln in text.splitlines() if ln and not ln[0].isspace() and ":" in ln
               and not ln.startswith("#")]
        return kind, text + "\n" + rng.choice(top) + "\n", True, []
    raw = bytearray(text.encode())
    if kind == "garbage":
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return kind, bytes(raw), False, []
    return kind, bytes(raw[: rng.randrange(len(raw))]), False, []  # truncate


def _dump(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


@pytest.mark.parametrize("seed", [11, 12])
def test_mutated_recipes_are_valid_or_refused_in_one_line(tmp_path, seed):
    rng = random.Random(seed)
    bases = [(yaml.safe_load(p.read_text()), p.read_text()) for p in SHIPPED]
    outcome: Counter = Counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(CASES // 2):
            base, text = rng.choice(bases)
            kind, body, must, sets = mutate(rng, base, text)
            f = tmp_path / f"r{i}.yaml"
            f.write_bytes(body if isinstance(body, bytes) else body.encode())
            case = f"case {i} ({kind}, --set {sets}): {f.read_bytes()[:300]!r}"
            signal.alarm(SECONDS)
            try:
                recipe = load_recipe(f, sets)
            except UserError as exc:
                msg = str(exc)
                assert msg and "\n" not in msg and len(msg) < 4000, case
                assert str(f) in msg or "--set" in msg, (case, msg)
                outcome[kind, "refused"] += 1
                continue
            except _Hang:
                pytest.fail(f"hang: {case}")
            finally:
                signal.alarm(0)
            assert not must, f"accepted, though it must be refused: {case}"
            assert_valid(recipe)
            outcome[kind, "accepted"] += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    assert sum(outcome.values()) == CASES // 2
    kinds = {k for k, _ in outcome}
    assert len(kinds) == 14, outcome  # every mutation kind was exercised
    print(dict(sorted(outcome.items())))
