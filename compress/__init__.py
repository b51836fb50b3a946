"""dit-compress: post-training compression for Diffusion Transformers.

    import compress
    report = compress.run_recipe("recipes/w8.yaml", model="demo", out="./demo-w8")
    pipe = compress.load_pipeline("./demo-w8")
"""

__version__ = "0.1.0"

# first: before anything can import diffusers (and with it bitsandbytes)
import compress._peer_logs  # noqa: F401
from compress.io.load import load_module, load_pipeline, load_transformer
from compress.lora import load_lora, unload_lora
from compress.models.spec import ModelSpec
from compress.recipe import Recipe, load_recipe
from compress.runner import run_recipe

__all__ = [
    "ModelSpec",
    "Recipe",
    "inspect",
    "load_lora",
    "load_module",
    "load_pipeline",
    "load_recipe",
    "load_transformer",
    "run_recipe",
    "unload_lora",
]


def inspect(module, example_inputs=None, spec=None, text: bool = True):
    """What dit-compress finds in your own module: blocks, and each layer's role with the reason.

    Args:
        module: an ``nn.Module`` (not changed: a copy is analysed).
        example_inputs: a tuple of positional inputs, a dict of keyword inputs, or ``(args,
            kwargs)``; one forward call on them is traced. None: containers and names only.
        spec: an optional ``ModelSpec``.
        text: return the printable view (else the JSON-able dict).
    """
    from compress.models.inspect import inspect_module

    return inspect_module(module, example_inputs, spec, text)
