"""Captured Hessians against explicit constructions, for every supported layer kind."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_obq.core.hessian import HessianAccumulator, layer_columns, weight_matrix

CONVS = {
    "conv2d_plain": (nn.Conv2d(4, 6, 3), (2, 4, 9, 9)),
    "conv2d_stride_pad": (nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9)),
    "conv2d_asym_kernel": (nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0)), (2, 4, 9, 8)),
    "conv2d_dilation": (nn.Conv2d(4, 6, 3, dilation=2, padding=2), (2, 4, 9, 9)),
    "conv2d_groups": (nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 7, 7)),
    "conv2d_depthwise": (nn.Conv2d(4, 4, 3, groups=4, padding=1), (2, 4, 7, 7)),
    "conv2d_same": (nn.Conv2d(4, 6, 4, padding="same"), (2, 4, 7, 7)),
    "conv2d_same_dilated": (nn.Conv2d(4, 6, 3, padding="same", dilation=2), (2, 4, 7, 7)),
    "conv2d_valid": (nn.Conv2d(4, 6, 3, padding="valid"), (2, 4, 7, 7)),
    "conv2d_reflect": (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 7, 7)),
    "conv2d_circular": (nn.Conv2d(4, 6, 3, padding=2, padding_mode="circular", groups=2), (2, 4, 7, 7)),
    "conv2d_replicate": (nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate", stride=2), (2, 4, 8, 8)),
    "conv2d_1x1_stride": (nn.Conv2d(4, 6, 1, stride=2), (2, 4, 7, 7)),
    "conv1d": (nn.Conv1d(4, 6, 3, padding=1, dilation=1), (2, 4, 11)),
    "conv1d_groups_stride": (nn.Conv1d(4, 8, 5, stride=2, groups=4, padding=2), (2, 4, 13)),
    "conv3d": (nn.Conv3d(2, 4, 3, padding=1), (2, 2, 5, 5, 5)),
    "conv3d_stride_dilation_groups": (
        nn.Conv3d(4, 4, 3, stride=2, dilation=(1, 2, 1), groups=2, padding=2), (1, 4, 7, 7, 7)
    ),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_columns_reproduce_the_conv_output(name: str) -> None:
    """W @ X per group equals the module's own output: the columns are the conv's true inputs."""
    torch.manual_seed(0)
    conv, shape = CONVS[name]
    x = torch.randn(shape)
    y = conv(x) - conv.bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    cols = layer_columns(conv, x)  # [G, d_col, B*L]
    w = weight_matrix(conv)  # [G, d_row/G, d_col]
    out = (w @ cols).reshape(conv.out_channels, x.shape[0], -1).transpose(0, 1)
    assert torch.allclose(out, y.reshape(x.shape[0], conv.out_channels, -1), atol=1e-5)


@pytest.mark.parametrize("name", [n for n in CONVS if n.startswith("conv2d")])
def test_conv2d_hessian_equals_explicit_unfold(name: str) -> None:
    torch.manual_seed(0)
    conv, shape = CONVS[name]
    batches = [torch.randn(shape) for _ in range(3)]
    acc = HessianAccumulator(conv)
    handles = acc.register()
    with torch.no_grad():
        for x in batches:
            conv(x)
    for handle in handles:
        handle.remove()
    x = torch.cat(batches)
    if conv.padding_mode != "zeros" or conv.padding == "same":
        x = F.pad(x, conv._reversed_padding_repeated_twice,
                  mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        padding = 0
    else:
        padding = 0 if conv.padding == "valid" else conv.padding
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    g = conv.groups
    cols = cols.reshape(x.shape[0], g, -1, cols.shape[-1]).permute(1, 2, 0, 3).reshape(g, cols.shape[1] // g, -1)
    expected = 2 / cols.shape[-1] * cols.double() @ cols.double().transpose(1, 2)
    assert acc.hessian.shape == expected.shape
    assert torch.allclose(acc.hessian.double(), expected, rtol=1e-5, atol=1e-5)
    assert acc.samples == 3 * shape[0]
    assert acc.columns == cols.shape[-1]


def test_linear_hessian_with_leading_dims_and_streaming() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    batches = [torch.randn(3, 5, 16) * (i + 1) + i for i in range(4)]
    acc = HessianAccumulator(lin)
    for x in batches:
        acc.update(x)
    x = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    expected = 2 / x.shape[0] * x.T @ x
    assert torch.allclose(acc.hessian[0].double(), expected, rtol=1e-5)
    assert acc.columns == 60 and acc.samples == 12


def test_streaming_mean_stays_accurate_for_large_inputs() -> None:
    """The running-mean update keeps float32 accuracy where a plain float32 sum would drift."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 2)
    acc = HessianAccumulator(lin)
    total = torch.zeros(8, 8, dtype=torch.float64)
    n = 0
    for _ in range(200):
        x = torch.randn(64, 8) * 1e3 + 1e3
        acc.update(x)
        total += x.double().T @ x.double()
        n += 64
    assert torch.allclose(acc.hessian[0].double(), 2 * total / n, rtol=1e-5)


def test_nan_activation_is_reported_with_the_layer_name() -> None:
    acc = HessianAccumulator(nn.Linear(4, 2), name="head.fc")
    with pytest.raises(ValueError, match="'head.fc'.*NaN"):
        acc.update(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))


def test_position_fraction_subsamples_columns_without_bias() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = F.avg_pool2d(torch.randn(16, 4, 16, 16), 3, 1, 1)
    full, half = HessianAccumulator(conv), HessianAccumulator(conv, position_fraction=0.5)
    for batch in x.split(4):
        full.update(batch)
        half.update(batch)
    assert half.columns == full.columns // 2 and half.samples == full.samples == 16
    rel = float((half.hessian - full.hessian).norm() / full.hessian.norm())
    assert 0 < rel < 0.15  # a different, noisier estimate of the same matrix (a 2x scale error gives 0.5)
    again = HessianAccumulator(conv, position_fraction=0.5)
    for batch in x.split(4):
        again.update(batch)
    assert torch.equal(again.hessian, half.hessian)  # seeded: reproducible


def test_position_fraction_is_validated() -> None:
    from lightning_obq import QuantConfig

    for bad in (0, 0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="position_fraction"):
            QuantConfig(position_fraction=bad)
    with pytest.raises(TypeError, match="position_fraction"):
        QuantConfig(position_fraction="half")
    with pytest.raises(ValueError, match="position_fraction"):
        HessianAccumulator(nn.Linear(2, 2), position_fraction=0.0)


class PadInForwardConv(nn.Conv2d):
    """A TF-style "same" conv as EfficientNet-Lite and timm build it: asymmetric zero padding inside ``forward``,
    then the conv with ``padding=0``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, padding=0, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


@pytest.mark.parametrize("groups", [1, 4])
def test_hessian_sees_the_input_a_conv_pads_inside_its_forward(groups: int) -> None:
    torch.manual_seed(0)
    conv = PadInForwardConv(4, 8, 3, groups=groups)
    plain = nn.Conv2d(4, 8, 3, groups=groups)
    batches = [torch.randn(2, 4, 7, 7) for _ in range(2)]
    accs = [HessianAccumulator(conv), HessianAccumulator(plain)]
    handles = [h for acc in accs for h in acc.register()]
    with torch.no_grad():
        for x in batches:
            conv(x)
            plain(F.pad(x, (0, 1, 0, 1)))
    for handle in handles:
        handle.remove()
    assert accs[0].columns == accs[1].columns == 2 * 2 * 6 * 6  # 6x6 outputs (5x5 without the padding)
    assert torch.equal(accs[0].hessian, accs[1].hessian)
    with torch.no_grad():  # no hook left behind: the next forward adds nothing
        conv(batches[0])
    assert accs[0].columns == 144
