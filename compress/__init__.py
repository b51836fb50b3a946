"""dit-compress: post-training compression for Diffusion Transformers.

    import compress
    report = compress.run_recipe("recipes/w8.yaml", model="demo", out="./demo-w8")
    pipe = compress.load_pipeline("./demo-w8")
"""

__version__ = "0.1.0"

from compress.io.load import load_pipeline, load_transformer
from compress.recipe import Recipe, load_recipe
from compress.runner import run_recipe

__all__ = ["Recipe", "load_pipeline", "load_recipe", "load_transformer", "run_recipe"]
