"""LoRA adapters on compressed outputs (a floating-point side branch beside compressed weights)."""

from compress.lora.load import fuse_lora_into, load_lora, set_strength, unload_lora

__all__ = ["fuse_lora_into", "load_lora", "set_strength", "unload_lora"]
