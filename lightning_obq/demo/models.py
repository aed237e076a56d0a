"""The demo's models: a small ResNet, a MobileNetV2-style CNN, a small vision transformer, and a LightningModule
that trains any classifier."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.vision_transformer import VisionTransformer


def _check_sizes(num_classes: int, in_channels: int, width: int) -> None:
    """The demo networks' common arguments, each at least 1."""
    if min(num_classes, in_channels, width) < 1:
        raise ValueError(f"num_classes, in_channels and width must be >= 1, got {num_classes}, {in_channels}, {width}")


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity (or 1x1 conv + BN projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-style CNN for 28x28 images that trains on Fashion-MNIST in a few CPU minutes (accuracy:
    benchmarks/results/paper_tables.md).

    Layout: 3x3 stem at full resolution, then three residual blocks (``width`` channels at 14x14,
    ``2*width`` at 7x7, ``4*width`` at 7x7), global average pooling and a linear classifier. Most
    compute is at low resolution so an epoch takes about half a minute on two CPU cores, while the
    Conv layers are large enough (up to ``4*width x 4*width*9`` weight matrices) for the quantizers to differ.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        _check_sizes(num_classes, in_channels, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.layer1 = BasicBlock(width, width, stride=2)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class MobileNetV2Small(nn.Module):
    """A MobileNetV2-style CNN for 28x28 images: inverted residual blocks with depthwise 3x3 convs.

    The depthwise convs (a 9x9 Hessian per channel) are the layers that collapse at uniform low bit
    widths in GPTQ-style quantizers, which makes this the test bed for mixed precision. Built from
    torchvision's own ``InvertedResidual`` block; ``width`` scales every stage (32 gives the widths
    16/24/32/64 of MobileNetV2's first stages and a 128-channel head).
    """

    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 1, 1))  # (expand, channels, repeats, stride)

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        _check_sizes(num_classes, in_channels, width)

        def scaled(c: int) -> int:
            return max(8, c * width // 32)

        layers: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(in_channels, scaled(32), 3, 1, 1, bias=False), nn.BatchNorm2d(scaled(32)), nn.ReLU6(inplace=True)
        )]
        channels = scaled(32)
        for expand, out, repeats, stride in self.STAGES:
            for i in range(repeats):
                layers.append(InvertedResidual(channels, scaled(out), stride if i == 0 else 1, expand))
                channels = scaled(out)
        layers.append(nn.Sequential(
            nn.Conv2d(channels, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width), nn.ReLU6(inplace=True)
        ))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class SmallViT(VisionTransformer):
    """torchvision's `VisionTransformer` sized for 28x28 images: 7x7 patches (16 tokens and a class token), four
    encoder blocks of 4-head self-attention (``nn.MultiheadAttention``) and an MLP, ``2 * width`` wide.

    The transformer of the demo: its attention projections are the layers torch computes from raw weights
    (`lightning_obq.model.attention`). The patch embedding takes ``in_channels`` (torchvision's takes 3).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        _check_sizes(num_classes, in_channels, width)
        if width % 2:
            raise ValueError(f"width must be even (4 heads share the 2 * width features), got {width}")
        dim = 2 * width
        super().__init__(image_size=28, patch_size=7, num_layers=4, num_heads=4, hidden_dim=dim, mlp_dim=2 * dim,
                         dropout=0.0, attention_dropout=0.0, num_classes=num_classes)
        self.conv_proj = nn.Conv2d(in_channels, dim, kernel_size=7, stride=7)


ARCHITECTURES: dict[str, type[nn.Module]] = {"smallresnet": SmallResNet, "mobilenetv2": MobileNetV2Small,
                                             "smallvit": SmallViT}


def build_network(arch: str = "smallresnet", num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    """One of the demo networks by name (``"smallresnet"``, ``"mobilenetv2"`` or ``"smallvit"``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes, in_channels, width)


class ImageClassifier(L.LightningModule):
    """Cross-entropy image classification around any ``nn.Module`` (default: `SmallResNet`).

    Logs ``train_loss``, ``val_loss``/``val_acc`` and ``test_loss``/``test_acc`` (torchmetrics accuracy).
    AdamW with a one-cycle learning-rate schedule over the whole fit. With ``model=None`` the network
    is rebuilt from the saved hyper-parameters, so checkpoints reload with ``load_from_checkpoint``.

    Args:
        model: the network; ``None`` builds ``build_network(arch, num_classes, in_channels, width)``.
        num_classes: classes of the task (sizes the accuracy metrics).
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        in_channels / width / arch: network settings when ``model`` is None.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        in_channels: int = 1,
        width: int = 32,
        arch: str = "smallresnet",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model if model is not None else build_network(arch, num_classes, in_channels, width)
        self.lr = lr
        self.weight_decay = weight_decay
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: Any, stage: str, metric: torchmetrics.Metric) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "train")
        self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        trainer = getattr(self, "_trainer", None)
        steps = trainer.estimated_stepping_batches if trainer is not None else None
        if not steps or steps == float("inf") or steps < 8:  # one-cycle needs a few steps to warm up and decay
            return optimizer
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=int(steps), pct_start=0.25
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
