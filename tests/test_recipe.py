"""Recipe validation: unknown keys name the key and the file; overrides; hash; order rules."""

from pathlib import Path

import pytest
import yaml

from compress.errors import UserError
from compress.recipe import apply_overrides, load_recipe, parse_gate, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate_and_round_trip(name, tmp_path):
    r = load_recipe(ROOT / "recipes" / name)
    dumped = tmp_path / "r.yaml"
    dumped.write_text(yaml.safe_dump(r.resolved()))
    r2 = load_recipe(dumped)
    assert r2.resolved() == r.resolved()
    assert r2.hash() == r.hash()


def _write(tmp_path, data) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_top_key(tmp_path):
    p = _write(tmp_path, {"name": "x", "passes": [{"ptq": {}}], "colour": 1})
    with pytest.raises(UserError, match=r"bad\.yaml.*unknown key 'colour'"):
        load_recipe(p)


def test_unknown_nested_pass_key(tmp_path):
    p = _write(tmp_path, {"name": "x", "passes": [{"ptq": {"weights": {"bitz": 4}}}]})
    with pytest.raises(UserError, match=r"bad\.yaml.*passes\.0\.ptq\.weights\.bitz"):
        load_recipe(p)


def test_bad_value_and_unknown_pass(tmp_path):
    p = _write(tmp_path, {"name": "x", "passes": [{"ptq": {"weights": {"bits": 7}}}]})
    with pytest.raises(UserError, match=r"passes\.0\.ptq\.weights\.bits"):
        load_recipe(p)
    p = _write(tmp_path, {"name": "x", "passes": [{"quantize": {}}]})
    with pytest.raises(UserError, match="unknown pass 'quantize'"):
        load_recipe(p)


def test_several_format_passes_read(tmp_path):
    # several format passes load; overlapping layer selections are refused at run time
    # (tests/test_vq.py), a structural pass after them here
    p = _write(tmp_path, {"name": "x", "passes": [{"vq": {"include": ["ff_in"]}}, {"ptq": {}}]})
    assert [n for n, _ in load_recipe(p).pass_specs()] == ["vq", "ptq"]


def test_overrides(tmp_path):
    r = load_recipe(ROOT / "recipes" / "w8.yaml", ["passes.0.ptq.weights.bits=6", "eval.num_prompts=3"])
    (_name, cfg), = r.pass_specs()
    assert cfg.weights.bits == 6 and r.eval.num_prompts == 3
    assert r.hash() != load_recipe(ROOT / "recipes" / "w8.yaml").hash()
    with pytest.raises(UserError, match="unknown key 'passes.0.ptq.weights.bitz'"):
        load_recipe(ROOT / "recipes" / "w8.yaml", ["passes.0.ptq.weights.bitz=6"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        apply_overrides({}, ["nonsense"], "r.yaml")
    with pytest.raises(UserError, match="list index"):
        apply_overrides({"passes": []}, ["passes.3.ptq.x=1"], "r.yaml")


def test_gates_parse():
    assert parse_gate(">= 30") == (">=", 30.0)
    assert parse_gate("<=0.01") == ("<=", 0.01)
    assert parse_gate(12) == (">=", 12.0)
    with pytest.raises(UserError, match="gates"):
        validate({"name": "x", "passes": [{"ptq": {}}], "gates": {"psnr_vs_teacher": "about 30"}}, "g.yaml")


def test_yaml_errors(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="broken.yaml.*not valid YAML"):
        load_recipe(p)
    with pytest.raises(UserError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")
