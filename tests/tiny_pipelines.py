"""Tiny random-weight diffusers pipelines of every supported family, built fully offline.

Every component is built from a config (no hub access). Tokenizers are built from small
in-memory vocabularies: character-level vocabularies in the format each pipeline's tokenizer
class expects, so they save and reload like the real ones. Images default to 32x32.
"""

from __future__ import annotations

import functools
import string

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

FAMILIES = ("dit", "pixart", "sd3", "flux", "sana")

# Image side in pixels that every tiny pipeline produces by default.
TINY_RESOLUTION = 32

# Class names of the tiny DiT; everything else maps to a hashed class id.
DIT_LABELS = {0: "red cube", 1: "blue sphere", 2: "cat, kitty", 3: "dog"}

_CHARS = string.ascii_lowercase + string.digits + string.punctuation


# ----------------------------------------------------------------------------- tokenizers


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram vocabulary of single characters (with and without the word-start marker)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in _CHARS + string.ascii_uppercase]
    vocab += [("\u2581" + c, -2.5) for c in _CHARS + string.ascii_uppercase]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2 scheme)."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with no merges: every word becomes its characters, last one ending '</w>'."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_level_alphabet():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _gemma_tokenizer() -> GemmaTokenizer:
    """Character BPE vocabulary in Gemma's special-token layout."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for ch in _CHARS + string.ascii_uppercase:
        vocab.setdefault(ch, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=2048)


# ----------------------------------------------------------------------------- encoders, vaes


def _t5_encoder(vocab_size: int, d_model: int = 32) -> T5EncoderModel:
    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(cfg).eval()


def _clip_config(vocab_size: int, hidden: int, projection_dim: int = 16) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _vae_kl(latent_channels: int, flow: bool = False) -> AutoencoderKL:
    """Two-level KL VAE: 2x downsampling. ``flow`` mimics SD3/Flux (no quant convs, shift)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=1.5 if flow else 0.18215,
        shift_factor=0.06 if flow else None,
        use_quant_conv=not flow,
        use_post_quant_conv=not flow,
    ).eval()


# ----------------------------------------------------------------------------- families


def _dit() -> DiffusionPipeline:
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,  # learned sigma, as in DiT-XL/2: the pipeline drops the second half
        num_layers=2,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION // 2,
        patch_size=2,
        num_embeds_ada_norm=1000,  # the pipeline hard-codes 1000 as the null class
    )
    pipe = DiTPipeline(
        transformer=transformer.eval(),
        vae=_vae_kl(4),
        scheduler=DPMSolverMultistepScheduler(),
        id2label=dict(DIT_LABELS),
    )
    # DiTPipeline does not record id2label itself; hub checkpoints keep it in model_index.json.
    pipe.register_to_config(id2label={str(k): v for k, v in DIT_LABELS.items()})
    return pipe


def _pixart() -> DiffusionPipeline:
    tok = _t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        norm_num_groups=4,
        cross_attention_dim=32,
        sample_size=TINY_RESOLUTION // 2,
        patch_size=2,
        caption_channels=32,
        use_additional_conditions=False,
    )
    return PixArtSigmaPipeline(
        tokenizer=tok,
        text_encoder=_t5_encoder(len(tok)),
        vae=_vae_kl(4),
        transformer=transformer.eval(),
        scheduler=DPMSolverMultistepScheduler(),
    )


def _sd3() -> DiffusionPipeline:
    tok = _clip_tokenizer()
    t5_tok = _t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 2,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,  # two CLIP text projections of 16, concatenated
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),  # SD3.5-medium style: block 0 has a second self-attention
        qk_norm="rms_norm",
    )
    clip1 = CLIPTextModelWithProjection(_clip_config(len(tok), 16)).eval()
    clip2 = CLIPTextModelWithProjection(_clip_config(len(tok), 16)).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae_kl(4, flow=True),
        text_encoder=clip1,
        tokenizer=tok,
        text_encoder_2=clip2,
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_encoder(len(t5_tok)),
        tokenizer_3=t5_tok,
    )


def _flux() -> DiffusionPipeline:
    tok = _clip_tokenizer()
    t5_tok = _t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,  # FLUX.1-dev style (distilled guidance input)
        axes_dims_rope=(2, 2, 4),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae_kl(4, flow=True),
        text_encoder=CLIPTextModel(_clip_config(len(tok), 16)).eval(),
        tokenizer=tok,
        text_encoder_2=_t5_encoder(len(t5_tok)),
        tokenizer_2=t5_tok,
        transformer=transformer.eval(),
    )


def _sana() -> DiffusionPipeline:
    tok = _gemma_tokenizer()
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=2048,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    ).eval()
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=4,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41,
    ).eval()
    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=16,
        sample_size=TINY_RESOLUTION // 2,
        patch_size=1,
    )
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    return SanaPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer.eval(),
        scheduler=scheduler,
    )


_BUILDERS = {"dit": _dit, "pixart": _pixart, "sd3": _sd3, "flux": _flux, "sana": _sana}


def build_tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """A tiny random-weight pipeline of ``family``; the same seed gives the same weights."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clone(tree):
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


@functools.cache
def first_call_inputs(family: str) -> tuple[tuple, dict]:
    """The transformer's inputs at the first step of the tiny pipeline (2 steps, seed 0)."""
    from compress.models import adapter_for

    pipe = build_tiny_pipeline(family)
    calls: list = []

    def grab(_mod, args, kwargs):
        if not calls:
            calls.append(_clone((args, kwargs)))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        adapter_for(pipe.transformer).generate(pipe, ["red cube"], [0], 2, None, None)
    finally:
        handle.remove()
    return calls[0]


def run_first_call(tr: torch.nn.Module, family: str) -> torch.Tensor:
    """``tr`` (any transformer of ``family``'s class) on :func:`first_call_inputs`."""
    from compress.models import adapter_for

    args, kwargs = first_call_inputs(family)
    with torch.no_grad():
        return adapter_for(tr).call(tr, _clone(args), _clone(kwargs))


def state_shapes(m: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}
