"""Load prompt lists from the file formats users already have (txt, jsonl, tsv, json, datasets)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from compress.errors import UserError

# Column / key names accepted as "the prompt", in order of preference.
PROMPT_KEYS = ("prompt", "Prompt", "text", "caption")


def load_prompts(source: str | Path, limit: int | None = None) -> list[str]:
    """Read prompts from a file or a saved ``datasets`` dataset.

    Supported: plain text (one prompt a line, blank lines skipped), JSON lines (key
    ``prompt``), TSV with a header row and a ``Prompt`` column, a JSON list of strings or of
    objects with ``prompt``, and a directory written by ``datasets``' ``save_to_disk`` (column
    ``prompt``, ``Prompt``, ``text`` or ``caption``).

    Args:
        source: path of the file or dataset directory.
        limit: keep only the first ``limit`` prompts.

    Returns:
        The prompts, stripped of surrounding whitespace, in file order.

    Raises:
        UserError: the path is missing, empty, of an unknown format, or lacks a prompt column.
    """
    path = Path(source).expanduser()
    if limit is not None and limit < 0:
        raise UserError(f"prompt limit must be >= 0, got {limit} (for {path})")
    if not path.exists():
        raise UserError(f"prompt file not found: {path}; check the path")
    if path.is_dir():
        prompts = _load_dataset_dir(path)
    else:
        prompts = _load_file(path)
    prompts = [p.strip() for p in prompts]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"no prompts in {path}; the file is empty or has only blank entries")
    return prompts[:limit] if limit is not None else prompts


MAX_PROMPT_FILE = 256 << 20  # PartiPrompts is 150 KB; a quarter of a gigabyte is not a prompt list


def _load_file(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: not a regular file (a device or a pipe); give a prompt file")
    with open(path, "rb") as f:
        data = f.read(MAX_PROMPT_FILE + 1)
    if len(data) > MAX_PROMPT_FILE:
        raise UserError(f"{path}: larger than {MAX_PROMPT_FILE >> 20} MiB; give a smaller "
                        "prompt file (only the first num_prompts are read anyway)")
    try:
        text = data.decode("utf-8-sig")  # -sig: tolerate a BOM from Windows editors
    except UnicodeDecodeError:
        raise UserError(
            f"{path} is not UTF-8 text; save it as UTF-8 (txt, jsonl, tsv or json)"
        ) from None
    if not text.strip():
        raise UserError(f"prompt file {path} is empty; put one prompt per line")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _parse_jsonl(path, text)
    if suffix == ".json":
        return _parse_json(path, text)
    if suffix == ".tsv":
        return _parse_tsv(path, text)
    if suffix in (".txt", ".prompts", ""):
        return _parse_txt(text)
    if suffix == ".csv":
        raise UserError(
            f"unknown prompt format for {path}: CSV is not supported; "
            "use .txt, .jsonl, .tsv (with a Prompt column) or .json"
        )
    # Unknown extension: sniff the content instead of refusing a file that is clearly usable.
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _parse_json(path, text)
    if stripped.startswith("{"):
        return _parse_jsonl(path, text)
    raise UserError(
        f"unknown prompt format for {path} (suffix {suffix!r}); "
        "use .txt, .jsonl, .tsv, .json or a datasets directory"
    )


def _parse_txt(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _prompt_of(obj: Any, path: Path, where: str) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for key in PROMPT_KEYS:
            if key in obj:
                if not isinstance(obj[key], str):
                    raise UserError(
                        f"{path}: {where} has a non-string {key!r}; prompts must be text"
                    )
                return obj[key]
        raise UserError(
            f"{path}: {where} has no 'prompt' key (keys found: {', '.join(map(str, obj)) or 'none'}); "
            "add a 'prompt' field to every entry"
        )
    raise UserError(
        f"{path}: {where} is a {type(obj).__name__}; expected a string or an object with 'prompt'"
    )


def _parse_jsonl(path: Path, text: str) -> list[str]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}: line {lineno} is not valid JSON ({e.msg}); fix that line"
            ) from None
        out.append(_prompt_of(obj, path, f"line {lineno}"))
    return out


def _parse_json(path: Path, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path}: invalid JSON at line {e.lineno} ({e.msg}); "
            "expected a list of strings, or use .jsonl for one object per line"
        ) from None
    if isinstance(data, dict):
        # A common wrapper: {"prompts": [...]}; accept it rather than make users reshape files.
        lists = [
            v for k, v in data.items() if k.lower() in ("prompts", "data") and isinstance(v, list)
        ]
        if not lists:
            raise UserError(
                f"{path}: top level is an object (keys: {', '.join(map(str, data))}); "
                "expected a JSON list of prompts"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(
            f"{path}: top level is a {type(data).__name__}; expected a JSON list of prompts"
        )
    return [_prompt_of(obj, path, f"entry {i}") for i, obj in enumerate(data)]


def _unquote(field: str) -> str:
    # TSV has no quoting rule, so fields are read raw (PartiPrompts has prompts that start
    # with a quoted word). Only a field wrapped whole in quotes, as spreadsheet exports
    # write them, is unwrapped.
    if len(field) >= 2 and field[0] == field[-1] == '"':
        inner = field[1:-1]
        if '"' not in inner.replace('""', ""):
            return inner.replace('""', '"')
    return field


def _parse_tsv(path: Path, text: str) -> list[str]:
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    header = [_unquote(c.strip()) for c in rows[0]]
    col = _pick_column(header)
    if col is None:
        raise UserError(
            f"{path}: no Prompt column in the TSV header (columns found: {', '.join(header)}); "
            "name the prompt column 'Prompt'"
        )
    idx = header.index(col)
    return [_unquote(r[idx]) for r in rows[1:] if idx < len(r)]


def _pick_column(columns: Iterable[str]) -> str | None:
    cols = list(columns)
    for key in PROMPT_KEYS:
        if key in cols:
            return key
    lowered = {c.lower(): c for c in cols}
    for key in PROMPT_KEYS:
        if key.lower() in lowered:
            return lowered[key.lower()]
    return None


def _load_dataset_dir(path: Path) -> list[str]:
    is_dataset = (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
    if not is_dataset:
        raise UserError(
            f"{path} is a directory but not a saved datasets dataset (no dataset_info.json); "
            "pass a prompt file or a directory written by Dataset.save_to_disk"
        )
    import datasets  # deferred: importing datasets costs ~1 s and most runs use plain files

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:  # damaged or foreign directories
        raise UserError(
            f"cannot read dataset at {path}: {e}; re-save it with save_to_disk"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        # Prefer the split meant for evaluation-style prompt lists, else the first one.
        split = next((s for s in ("train", "test", "validation") if s in ds), next(iter(ds), None))
        if split is None:
            raise UserError(f"dataset at {path} has no splits; save a dataset with a prompt column")
        ds = ds[split]
    col = _pick_column(ds.column_names)
    if col is None:
        raise UserError(
            f"dataset at {path} has no prompt column (columns found: {', '.join(ds.column_names)}); "
            "add a 'prompt', 'text' or 'caption' column"
        )
    values = ds[col]
    bad = next((v for v in values if not isinstance(v, str)), None)
    if bad is not None:
        raise UserError(f"dataset at {path}: column {col!r} holds {type(bad).__name__}, not text")
    return list(values)


def _vocabulary_words(pipeline) -> list[str]:
    """Whole words of the pipeline's tokenizer vocabularies (word-piece, sentence-piece and
    byte-level markers stripped), sorted: the material of random prompts."""
    words: set[str] = set()
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipeline, name, None) if pipeline is not None else None
        vocab = getattr(tok, "get_vocab", None)
        if vocab is None:
            continue
        for piece in vocab():
            if piece.startswith("##"):
                continue  # a word-piece continuation, not a word
            w = piece.replace("\u2581", "").replace("\u0120", "").removesuffix("</w>")
            if len(w) >= 3 and w.isascii() and w.isalpha():
                words.add(w.lower())
    return sorted(words)


def random_prompts(pipeline, n: int, seed: int = 0) -> list[str]:
    """``n`` prompts of 3 to 12 words drawn at random from the pipeline's tokenizer vocabulary
    (zero-data calibration: random conditions, as random class labels are for a class-conditional
    model; a class-conditional DiT maps each to a class by hash). Without a tokenizer the words
    are random letter strings. Deterministic for a seed."""
    import random

    rng = random.Random(seed)
    words = _vocabulary_words(pipeline)
    if len(words) < 100:
        letters = "abcdefghijklmnopqrstuvwxyz"
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9)))
                 for _ in range(5000)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]
