"""Integer weight formats and the plain ptq pass on a generic nn.Module."""

import pytest
import torch
from torch import nn

from compress.modules.int4 import Int4Linear
from compress.modules.qlinear import QLinear
from compress.quant import qtensor


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_pack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 61), generator=g).to(torch.uint8)
    packed = qtensor.pack(codes, bits)
    assert packed.shape[1] == (qtensor.packed_cols(61, bits) if bits < 8 else 61)
    assert torch.equal(qtensor.unpack(packed, bits, 61), codes)


# SQNR floors for Gaussian weights: ~6 dB a bit, minus a margin
@pytest.mark.parametrize(
    "bits,group,sym,floor",
    [(8, None, True, 38), (6, None, True, 26), (4, 32, True, 17), (4, None, False, 14),
     (3, 16, False, 11), (2, 16, True, 3)],
)
def test_qlinear_error_bounds(bits, group, sym, floor):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    q = QLinear.from_linear(lin, bits, group, sym)
    x = torch.randn(16, 128)
    assert qtensor.sqnr_db(lin(x), q(x)) > floor
    # the stored grid is exact: every dequantised weight is code * scale (- zero)
    w = q.dequantized_weight()
    assert torch.isfinite(w).all()
    # error never exceeds half a step (plus fp rounding)
    step = q.scale.float().repeat_interleave(group or 128, dim=1)[:, :128]
    assert ((w - lin.weight).abs() <= step / 2 + 1e-6).all()


def test_qlinear_keeps_no_float_weight():
    q = QLinear.from_linear(nn.Linear(64, 32), 4, 32)
    names = dict(q.named_parameters()) | dict(q.named_buffers())
    assert "weight" not in names
    assert q.qweight.dtype == torch.uint8


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2)
        )
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def test_ptq_on_generic_module_regex_and_overrides():
    from compress.models.base import ModelHandle
    from compress.models.generic import ADAPTER
    from compress.passes.ptq import Config, apply

    torch.manual_seed(0)
    m = Toy()
    x = torch.randn(4, 32)
    ref = m(x)
    h = ModelHandle(transformer=m, adapter=ADAPTER)
    cfg = Config.model_validate({
        "weights": {"bits": 4, "granularity": "group", "group_size": 16},
        "include": ["re:blocks\\..*", "head"],
        "overrides": {"head": {"bits": 8}, "re:blocks\\.1\\..*": {"skip": True}},
    })
    res = apply(h, None, cfg)
    assert isinstance(m.head, QLinear) and m.head.bits == 8
    # weight-only int4 whose groups tile the inputs runs on the fast Int4Linear
    assert isinstance(m.blocks[0][0], Int4Linear) and m.blocks[0][0].group_size == 16
    assert isinstance(m.blocks[1][0], nn.Linear)
    assert set(res.meta["layers"]) == {"blocks.0.0", "blocks.0.2", "head"}
    assert qtensor.sqnr_db(ref, m(x)) > 15
