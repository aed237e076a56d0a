"""LightningCLI with the demo model and data: quantization is one ``--config`` away.

    python examples/lightning_cli.py fit --config callbacks/obq_w4.yaml --trainer.max_epochs=3
    python examples/lightning_cli.py fit --config callbacks/obq_w4.yaml --model.width=16 \
        --data.train_samples=5000 --trainer.callbacks.init_args.method=gptq
    python examples/lightning_cli.py test --config callbacks/obq_w4.yaml --ckpt_path <a checkpoint of fit>

`callbacks/obq_w4.yaml` adds `OBQCallback(bits=4)` to the trainer: after ``fit`` the module is evaluated,
quantized with FastOBQ on training images, evaluated again, and everything is logged. Every argument of
`ImageClassifier` (``--model.*``), `FashionMNISTDataModule` (``--data.*``), the Trainer and the callback
can be set from the command line or a YAML file (``--print_config`` shows them all). ``test`` (or
``validate``) with the same config file quantizes the checkpoint's full-precision weights before the loop
and reports the quantized model; a checkpoint the callback saved quantized is tested as is.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from lightning_obq.demo.data import FashionMNISTDataModule
from lightning_obq.demo.models import ImageClassifier


def main(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(
        ImageClassifier, FashionMNISTDataModule, seed_everything_default=0, run=run,
        args=list(args) if args is not None else None, save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
