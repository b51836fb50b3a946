"""The demo text-to-image pipeline shipped with the package, its data generator and loader."""

from compress.demo.pipeline import (
    DEMO_DEFAULTS,
    demo_call_kwargs,
    demo_dir,
    load_demo_pipeline,
    materialize_demo,
)

__all__ = [
    "DEMO_DEFAULTS",
    "demo_call_kwargs",
    "demo_dir",
    "load_demo_pipeline",
    "materialize_demo",
]
