"""The demo's models: a small ResNet with BatchNorm and a LightningModule that trains any classifier."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics


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
    """A ResNet-style CNN for 28x28 images that trains to ~91% Fashion-MNIST accuracy in a few CPU minutes.

    Layout: 3x3 stem at full resolution, then three residual blocks (``width`` channels at 14x14,
    ``2*width`` at 7x7, ``4*width`` at 7x7), global average pooling and a linear classifier. Most
    compute is at low resolution so an epoch takes about half a minute on two CPU cores, while the
    Conv layers are large enough (up to ``4*width x 4*width*9`` weight matrices) for the quantizers to differ.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        if min(num_classes, in_channels, width) < 1:
            raise ValueError(
                f"num_classes, in_channels and width must be >= 1, got {num_classes}, {in_channels}, {width}"
            )
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


class ImageClassifier(L.LightningModule):
    """Cross-entropy image classification around any ``nn.Module`` (default: `SmallResNet`).

    Logs ``train_loss``, ``val_loss``/``val_acc`` and ``test_loss``/``test_acc`` (torchmetrics accuracy).
    AdamW with a one-cycle learning-rate schedule over the whole fit. With ``model=None`` the network
    is rebuilt from the saved hyper-parameters, so checkpoints reload with ``load_from_checkpoint``.

    Args:
        model: the network; ``None`` builds ``SmallResNet(num_classes, in_channels, width)``.
        num_classes: classes of the task (sizes the accuracy metrics).
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        in_channels / width: `SmallResNet` settings when ``model`` is None.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        in_channels: int = 1,
        width: int = 32,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model if model is not None else SmallResNet(num_classes, in_channels, width)
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
        if not steps or steps == float("inf"):
            return optimizer
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=int(steps), pct_start=0.25
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
