"""The user's model and data for ``quantize`` / ``compare``: a torchvision architecture, a demo network
(`SmallResNet`, `MobileNetV2Small`, `SmallViT`) or a class path, loaded from a checkpoint, with ImageFolder or
Fashion-MNIST data."""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from lightning_obq.cli.arguments import json_arg
from lightning_obq.cli.errors import CLIError
from lightning_obq.core.config import QuantConfig
from lightning_obq.demo.data import fashion_mnist, image_folder, subset
from lightning_obq.demo.models import ARCHITECTURES, ImageClassifier, build_network


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A state_dict (and Lightning hyper-parameters, if any) from a ``.ckpt``/``.pt`` or ``.safetensors`` file.

    Pickle files are read with ``torch.load(weights_only=True)``, so no code inside them runs.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CLIError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling/safetensors errors have many types
        raise CLIError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from exc
    hparams = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        hparams = obj.get("hyper_parameters")
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CLIError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict of tensors")
    return obj, dict(hparams) if isinstance(hparams, dict) else None


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str, what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the checkpoint and the model."""
    own = set(model.state_dict())
    if not own & set(state) and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}  # ImageClassifier checkpoint into its network
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        missing = sorted(own - set(state))
        unexpected = sorted(set(state) - own)
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]!r})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})")
        if not detail:
            lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
            detail.append(lines[0] if lines else str(exc).splitlines()[0])
        raise CLIError(f"checkpoint {path} does not fit {what}: {'; '.join(detail)}") from exc


def build_model(args: argparse.Namespace) -> tuple[L.LightningModule, nn.Module, str]:
    """(LightningModule to run, network whose layers are exported, description) from the model options."""
    spec = args.model
    init_args = json_arg(args.init_args, "--init-args")
    state, hparams = load_checkpoint(args.checkpoint) if args.checkpoint else (None, None)
    num_classes = args.num_classes
    if ":" in spec:
        cls = _import_class(spec)
        kwargs = init_args if init_args else (hparams or {})
        try:
            obj = cls(**kwargs)
        except TypeError as exc:
            raise CLIError(f"cannot build {spec} with arguments {kwargs}: {exc}") from exc
        if isinstance(obj, L.LightningModule):
            if state is not None:
                _load_into(obj, state, args.checkpoint, spec)
            return obj, obj, spec
        if not isinstance(obj, nn.Module):
            raise CLIError(f"{spec} is a {type(obj).__name__}, not a LightningModule or nn.Module")
        net, what = obj, spec
    elif spec.lower() in ARCHITECTURES:
        width = int(init_args.get("width", (hparams or {}).get("width", 32)))
        net = build_network(spec.lower(), num_classes or 10, int(init_args.get("in_channels", 1)), width)
        what = f"{spec.lower()}(width={width})"
    else:
        net, what = _torchvision_model(spec, args.weights, num_classes, init_args), spec
    if state is not None:
        _load_into(net, state, args.checkpoint, what)
    outputs = _num_outputs(net)
    return ImageClassifier(model=net, num_classes=outputs), net, what


def _torchvision_model(name: str, weights: str | None, num_classes: int | None, init_args: dict) -> nn.Module:
    from torchvision import models

    available = models.list_models()
    if name not in available:
        close = [m for m in available if name.lower()[:4] in m][:6]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CLIError(f"unknown architecture {name!r}: not a torchvision model, one of the demo's "
                       f"{sorted(ARCHITECTURES)}, or a class path "
                       f"'package.module:Class'{hint}")
    kwargs = dict(init_args)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return models.get_model(name, weights=weights, **kwargs)
    except KeyError as exc:
        raise CLIError(f"unknown weights {weights!r} for {name}") from exc
    except (ValueError, TypeError) as exc:
        raise CLIError(f"cannot build {name}: {exc}") from exc
    except OSError as exc:  # weight download without internet
        raise CLIError(f"cannot download the {weights} weights of {name}: {exc}") from exc


def _import_class(spec: str) -> type:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"unknown architecture {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    obj = module
    for part in attr.split("."):
        if not part or not hasattr(obj, part):
            raise CLIError(f"unknown architecture {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise CLIError(f"{spec} is not a class")
    return obj


def _num_outputs(net: nn.Module) -> int:
    """Classes of a classifier: the output features of its last Linear (or channels of its last conv)."""
    last = [m for m in net.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not last:
        raise CLIError(f"{type(net).__name__} has no Linear/Conv2d layer to quantize")
    m = last[-1]
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _in_channels(net: nn.Module) -> int:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def build_data(args: argparse.Namespace, net: nn.Module) -> tuple[Dataset, Dataset, str]:
    """(calibration set, evaluation set, description): built-in Fashion-MNIST or ImageFolder(s)."""
    channels = _in_channels(net)
    if channels not in (1, 3):
        raise CLIError(f"the model takes {channels} input channels; image data gives 1 or 3")
    calib_src = args.calib_data or args.data
    eval_src = args.eval_data or args.data

    def load(src: str, train: bool, samples: int | None) -> Dataset:
        if src.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
            return subset(fashion_mnist(train, channels=channels), samples, args.seed)
        folder = Path(src).expanduser()
        if not folder.exists():
            raise CLIError(f"data folder {folder} does not exist (or use 'fashion-mnist')")
        split = folder / ("train" if train else "val")
        if split.is_dir():
            folder = split
        try:
            return image_folder(folder, image_size=args.image_size, channels=channels, samples=samples, seed=args.seed)
        except FileNotFoundError as exc:
            raise CLIError(str(exc)) from exc

    calib = load(calib_src, True, None)
    evaluation = load(eval_src, False, args.eval_samples)
    return calib, evaluation, f"calibration {calib_src} ({len(calib)} images), evaluation {eval_src} " \
                              f"({len(evaluation)} images)"


def _dataset_classes(dataset: Dataset) -> list[str] | None:
    while not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # Subset
    return getattr(dataset, "classes", None)


def prepare(args: argparse.Namespace) -> tuple[L.LightningModule, nn.Module, str, DataLoader, DataLoader, str]:
    module, net, what = build_model(args)
    calib, evaluation, data_desc = build_data(args, net)
    classes = _dataset_classes(evaluation)
    outputs = getattr(module, "hparams", {}).get("num_classes") if isinstance(module, ImageClassifier) else None
    if classes is not None and outputs is not None and len(classes) > outputs:
        raise CLIError(f"the evaluation data has {len(classes)} classes but {what} has {outputs} outputs; "
                       "pass --num-classes or data with matching classes")
    calib_loader = DataLoader(calib, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    eval_loader = DataLoader(evaluation, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    return module, net, what, calib_loader, eval_loader, data_desc


def base_config(args: argparse.Namespace, progress: bool, module: nn.Module, net: nn.Module) -> QuantConfig:
    """Settings shared by every job; ``--skip`` patterns name layers of the network as the user knows it."""
    prefix = "" if net is module else next(name for name, m in module.named_modules() if m is net) + "."
    return QuantConfig(bits=4, calib_samples=args.calib_samples, bn_mode=args.bn_mode, granularity=args.granularity,
                       kernel_row_grid=args.kernel_row_grid, symmetric=args.symmetric, progress=progress,
                       exclude=tuple(prefix + p for p in args.skip))
