"""Drop the two known-harmless lines bitsandbytes' import logs on CPUs with AVX512-BF16 when it
cannot fetch its optional CPU kernel from the Hub (offline, or no ``kernels`` package).

compress never imports bitsandbytes, but diffusers does whenever it is installed: any diffusers
model class pulls diffusers.models.modeling_utils -> diffusers.quantizers (auto.py) ->
quantizers/bitsandbytes/utils.py -> ``import bitsandbytes``, so ``compress.load_pipeline(OUT)``
printed them. Keeping diffusers from importing it would mean patching diffusers' internals (its
``_bitsandbytes_available`` flag) and break bitsandbytes for the user's own diffusers models in the
same process; the lines are only logged on that first import, so these filters drop exactly them
and let every other bitsandbytes or kernels message through. Imported first by ``compress``.
"""

from __future__ import annotations

import logging


def _drop_bitsandbytes_kernel_warning(record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not (msg.startswith("Failed to load CPU gemm_4bit_forward")
                or "kernels-community/quantization-bitsandbytes" in msg)


# the loggers (logging.getLogger(__name__)) of bitsandbytes/backends/cpu/ops.py and of
# kernels/_internals/hf_hub.py ("Skipping publisher trust check for '...'" offline)
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).addFilter(_drop_bitsandbytes_kernel_warning)
