"""Lightning integration (the ``[lightning]`` extra): `OBQCallback`, DDP hooks, loggers, evaluation.

`callback` holds the hooks and the steps they call; `arguments` the one path from its arguments into
`QuantConfig`; `evaluation` the FP/quantized evaluation and fidelity; `loaders` where the calibration and
evaluation batches come from; `distributed` the DDP hooks of `quantize_model`; `loggers` what reaches
each logger; `handoff` the results of spawned workers. How `OBQCallback` behaves:

**validate / test** (any ``when``): outside ``fit`` the callback makes sure the evaluated model is
quantized, after Lightning has loaded any ``ckpt_path`` and before the first batch, and says what it
did in one line whenever it does not quantize afresh:

- the module already holds this callback's quantized weights (``trainer.test()`` after ``fit``, or the
  ``obq-w<bits>-final.ckpt`` file): evaluated as is;
- the checkpoint was saved after OBQCallback quantized it (another process): evaluated as is;
- the checkpoint holds exactly the FP weights this callback quantized (``ckpt_path="last"`` after
  ``fit``): its FP metrics are measured, then the quantized weights are put back;
- any other full-precision weights (``ckpt_path="best"`` from an earlier epoch, a saved file in an
  evaluation script): FP metrics measured on that loop's dataloaders, then quantized, and the result
  saved as ``obq-w<bits>-<checkpoint name>.ckpt`` beside the loaded file.

So ``trainer.fit(model); trainer.test(ckpt_path="best")`` reports the quantized model. The loop's own
metrics are then the quantized ones under the module's names; the callback adds ``obq/<name>``,
``obq/fp/<name>`` and ``obq/<name>_delta``. ``when="validation_start"`` differs from the default only in
refusing ``trainer.fit`` (quantizing between training steps would move weights off the grid).

**Metric names**: everything this callback logs starts with ``obq/``, so it never logs a second value
under a name the module logs at the same step: FP task metrics as ``obq/fp/<name>``, quantized ones as
``obq/<name>``. A second quantization logged at a step where this callback already logged one (fit,
then ``test(ckpt_path="best")`` on another epoch's weights) puts each name it would repeat under
``obq/ckpt/...``. ``callback.report.metrics`` keeps the FP values under their own names (``val_acc``),
the quantized ones as ``obq/val_acc``, the difference ``obq/val_acc_delta``, and ``obq/top1_agreement``
/ ``obq/kl_div``. Best-so-far trackers (torchmetrics ``MaxMetric``/``MinMetric`` ...) are reset in the
evaluation copy, so ``obq/val/acc_best`` is the best over that one evaluation (equal to
``obq/val/acc``), never the training history.

**DDP** (``strategy="ddp"``, one or many nodes): every rank calibrates on its shard (Lightning's
``DistributedSampler`` of the train loader; a given ``calib_dataloader`` is sharded the same way), with
``calib_samples`` split over the ranks; Hessians and sample counts are all-reduced, each layer is solved
once on one rank and broadcast, and the BatchNorm step (fitting, ``auto``'s scores and choice) runs over
all ranks' samples (`StrategyHooks.batchnorm_sync`), so every rank ends with identical weights.
Validation metrics are averaged over ranks like ``self.log(..., sync_dist=True)``.
**Spawn strategies** (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``): Lightning returns the weights and
``callback_metrics`` to the main process; rank zero also hands the report (without its tensors) and the
checkpoint paths back through a temporary JSON file, read on first use of ``callback.report``.

**Checkpoints**: `state_dict` holds the config, ``quantized`` and the report (``to_dict``). A checkpoint
saved after quantizing holds the quantized weights (on the grid) and reloads as the quantized model.
Resuming ``trainer.fit`` from it is refused with a `RuntimeError` (training would move the weights off
the grid): load the weights with ``load_from_checkpoint`` and start a new fit to fine-tune.

**Failures**: bad arguments raise at construction (`ValueError`/`TypeError` naming the ``OBQCallback``
argument, with the closest valid name for a misspelt one). If quantization fails, `quantize_model`
restores the FP weights; if anything after it fails (the quantized evaluation, fidelity, logging), the
callback restores the FP weights and buffers itself and re-raises, so the module is never left half-done.
A failing export (the last step) leaves the module quantized and re-raises. Under DDP an error raised on
only one rank inside a collective (for example a validation step failing on one rank only) can still
stall the other ranks until the process-group timeout; quantization errors themselves are propagated to
all ranks.

**W&B**: runs are offline unless the user chose a mode: when ``WANDB_MODE`` is unset, the constructor
sets ``WANDB_MODE=offline`` for the process (Lightning creates the `WandbLogger` run before any callback
hook, so the constructor is the last moment that works). ``WANDB_MODE=online``,
``WandbLogger(mode="online")`` or ``OBQCallback(wandb_offline=False)`` keep runs online; upload an offline
run later with ``wandb sync <run dir>``.
"""

from lightning_obq.extras import require_extra

require_extra("lightning", "lightning_obq.integrations.lightning (OBQCallback)")

from lightning_obq.integrations.lightning.callback import OBQCallback  # noqa: E402
from lightning_obq.integrations.lightning.fidelity import OutputFidelity  # noqa: E402

__all__ = ["OBQCallback", "OutputFidelity"]
