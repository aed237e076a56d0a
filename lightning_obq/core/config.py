"""`QuantConfig`: the validated settings every entry point (layer, model, callback, CLI) shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

METHODS = ("fastobq", "gptq", "obq", "rtn")
ORDERS = ("sensi_dyn", "sensi_des", "sensi_asc", "err_des", "err_asc", "w_des", "w_asc", "none", "act")
GPTQ_ORDERS = ("none", "act")
GRANULARITIES = ("channel", "tensor", "group")
KERNEL_ROW_GRIDS = ("row", "granularity")
# Input channels per output channel up to which a conv gets one grid per kernel row (`QuantConfig.kernel_row_grid`):
# depthwise convs (one) and image stems (RGB: three).
ROW_GRID_MAX_INPUTS = 3
RANGE_SEARCHES = ("minmax", "mse")
DAMP_MODES = ("absolute", "relative")
CALIBRATION_MODES = ("one_pass", "sequential")
BN_MODES = ("auto", "keep", "reestimate", "correct")
GAIN_METHODS = ("auto", "exact", "linear")
DEFAULT_ORDER = {"fastobq": "sensi_dyn", "gptq": "none", "obq": None, "rtn": None}
COLUMN_PARALLEL_METHODS = ("fastobq", "gptq")
"""The methods that quantize one column of all rows at a time with a shared update: they take an ``order``."""
REFINING_METHODS = COLUMN_PARALLEL_METHODS
"""The methods with a refinement stage after their column-parallel solve (`refine_sweeps`)."""
DEFAULT_REFINE_SWEEPS = {"fastobq": 1, "gptq": 0, "obq": 0, "rtn": 0}
"""fastobq refines every layer with one sweep by default: a sweep never raises the layer objective, puts fastobq's
layer error below gptq act order's on every resnet18 shape at 1.37-1.57x gptq's time on the large ones, and on
the paper CNN lifts W2 accuracy above exact OBQ's (`benchmarks/results/layers.md`, `paper_tables.md`). More
sweeps lower the error further (``refine_sweeps=3``) at up to 2x gptq's time. gptq stays the reference algorithm
unless asked."""
DEFAULT_SINGLE_ROW_REFINE_SWEEPS = {"fastobq": 3, "gptq": 0, "obq": 0, "rtn": 0}
"""fastobq refines the layers with one output row per group (depthwise convs) by default: the shared column order
has no rows to share there, a sweep over at most 25 columns costs next to nothing, and on EfficientNet-Lite1's
depthwise convs at W4 it lowers their summed layer error below exact OBQ's (`benchmarks/results/depthwise.md`)."""
LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
}


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"QuantConfig.{name}={value!r} is not one of {list(choices)}")


def _check_number(name: str, value: Any, low: float, high: float, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise TypeError(f"QuantConfig.{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"QuantConfig.{name}={value!r} is outside [{low}, {high}]")


@dataclass
class QuantConfig:
    """Settings for quantizing one layer or a whole model.

    Every field is checked when the config is built, so a typo fails at once with the field's name
    instead of half-way through a long calibration.

    Args:
        bits: weight bit width, 2..8.
        method: ``"fastobq"`` (sensitivity-ordered column-parallel OBQ), ``"gptq"``, ``"obq"``
            (exact greedy per weight, slow) or ``"rtn"`` (round to nearest).
        order: column order for ``fastobq``/``gptq``. ``None`` picks the method's default
            (``sensi_dyn`` for fastobq: the paper's sensitivity order, re-ranked as quantization updates
            the weights and ``H^-1``; natural ``none`` for gptq). ``sensi_des`` is the paper's one-off
            sort; gptq accepts ``none`` and ``act``.
        symmetric: symmetric grid (zero point in the middle) instead of asymmetric min/max.
        granularity: one grid per output ``"channel"``, per ``"tensor"``, or per ``"group"`` of
            ``group_size`` input columns in each row.
        group_size: columns per group when ``granularity="group"``.
        kernel_row_grid: the grid of convs whose output channels each see at most `ROW_GRID_MAX_INPUTS` input
            channels (depthwise convs, RGB and grayscale image stems) through a kernel of more than one row.
            ``"row"`` (default): one grid per kernel row (``kernel_size[-1]`` weights) instead of one per channel,
            under ``"channel"`` and coarser ``"group"`` granularity. Such a channel has only its few ``k x k``
            kernels and almost no other inputs to compensate its rounding with, and its weights span very
            different ranges: on pretrained EfficientNet-Lite1 at W8 the per-channel grid of its depthwise convs
            changed 4.7 % of the top-1 predictions, the per-row grid 1.6 % (``benchmarks/results/pretrained.md``).
            The extra scales are counted in the model size (4 % of Lite1's weights are depthwise: its
            quantized layers take 5.7 % more storage at W8, 11 % at W4). Each such conv is also solved on the
            other grid and keeps whichever has the lower layer objective. That objective can mislead gptq on a
            stem: on the README's CNN its per-row stem has the lower objective, yet W4 gptq keeps 91.59 % test
            accuracy against 91.75 % with the per-channel stem. ``"granularity"``: as every other layer.
        range_search: ``"mse"`` searches the clipping ratio that minimises the grid error (REQuant);
            ``"minmax"`` uses the full weight range.
        damp: Hessian damping. ``damp_mode="absolute"`` adds ``damp`` to the diagonal (paper: 0.1);
            ``"relative"`` adds ``damp * mean(diag(H))`` (GPTQ style, e.g. 0.01).
        block_size: columns per lazy block update in fastobq/gptq (speed only: results differ by float rounding).
            The default is the fastest size on this project's CPU benchmarks (GPTQ's reference uses 128 on GPUs).
        refine_sweeps: most sweeps of the refinement stage after the column-parallel solve of fastobq/gptq
            (block coordinate descent over the columns on the solve's damped layer objective, then a closed-form
            refit of the scales; `refine.refine_solution`); sweeps stop early once one gains under 0.1 %.
            ``None`` picks the method's default: 1 for fastobq, 0 (off) for gptq (`DEFAULT_REFINE_SWEEPS`);
            0 turns it off, 3 lowers the error further at up to 2x gptq's solve time.
        single_row_refine_sweeps: sweeps of the same stage on layers with one output row per group (depthwise
            convs), where the larger of the two applies. ``None`` picks the method's default: 3 for fastobq
            (`DEFAULT_SINGLE_ROW_REFINE_SWEEPS`), 0 for gptq; 0 turns it off.
        obq_memory_mb: memory budget for the batch of per-row inverse Hessians of ``obq``.
        calibration: ``"one_pass"`` (all Hessians from the FP model) or ``"sequential"`` (each layer
            sees the outputs of already quantized predecessors).
        calib_samples: maximum number of calibration samples drawn from the loader.
        forward_batch: samples per forward pass of every calibration pass (Hessians, BatchNorm, mixed
            precision): the loader's batches are cut into pieces of at most this many, same samples, same
            order. ``None`` (default): on CPU, pieces small enough that the largest quantized layer's output
            stays under 16 MB (at least 8 samples), because CPU convolutions over feature maps that overflow
            the caches run several times slower; on other devices the loader's batches.
        hessian_memory_mb: in one-pass mode, Hessians larger than this in total are captured in
            several passes over groups of layers.
        position_fraction: share of each layer's input columns (conv output positions, or tokens of a
            Linear) that enter its Hessian, drawn at random (seeded) per batch. Calibration GEMM work
            falls in proportion; the Hessian stays an unbiased estimate but noisier, so layer errors
            grow a little. ``1.0`` (default) uses every position.
        include / exclude: ``fnmatch`` patterns on module names (``"layer4.*"``); a layer is
            quantized if it matches an include pattern (all by default) and no exclude pattern.
        layer_types: which module kinds to quantize, by name (``"Linear"``, ``"Conv1d"``, ...).
        bn_mode: what happens to BatchNorm running statistics after quantizing. ``"keep"`` leaves the trained
            statistics; ``"reestimate"`` resets and re-estimates them on the calibration data (the paper's
            step, which replaces good statistics with bad ones when the calibration set is small or not
            drawn from the training data); ``"correct"`` keeps the trained variances and shifts each running
            mean by the change of that BatchNorm's input mean that quantization caused on the calibration
            data (empirical bias correction); ``"auto"`` (default) holds back part of the calibration
            data, tries every other mode and keeps the one whose outputs are closest to the FP model's on
            the held-back samples, when it wins by more than the measurement's noise (2 standard errors of
            the per-sample improvement; see `lightning_obq.model.batchnorm`), so it can never do worse there
            than ``"keep"``. A model without BatchNorm does no extra work.
        reestimate_bn: the older spelling: ``True`` means ``bn_mode="reestimate"``, ``False`` ``"keep"``.
        bn_holdout: share of the calibration samples ``bn_mode="auto"`` holds back to measure the candidates
            (at most ``bn_holdout_samples`` of them); the candidates are fitted on the rest.
        bn_holdout_samples: cap on the held-back samples.
        budget: mixed precision: target average bits per quantized weight (e.g. 3.5). Each layer gets one
            of ``candidate_bits`` so that the predicted model loss is least within the budget; ``bits``
            is then only the reference width for the uniform comparison in the report.
        budget_mb: mixed precision with the budget as the size in MB of the quantized layers (codes plus
            float32 scales and zero points). At most one of ``budget``/``budget_mb``.
        candidate_bits: bit widths mixed precision may choose from (default: every width 2-8; each is one more
            solve per layer, and at a 4.0-bit budget the 5- and 7-bit steps lowered the KL to FP by 3 % on
            EfficientNet-Lite1 and 7 % on Lite2 against (2, 3, 4, 6, 8)).
        pin: ``{pattern: bits}`` fixing matching layers to a width under a budget (e.g. ``{"conv1": 8}``).
        sensitivity_samples: calibration samples used to measure each layer's effect on the model output.
        gains: how mixed precision measures each layer's effect on the model output: ``"exact"`` (one
            forward pass per layer), ``"linear"`` (a first-order estimate for all layers from a few
            forward/backward passes) or ``"auto"`` (exact up to 32 layers); see `lightning_obq.model.mixed`.
        progress: show a progress bar over layers when on a terminal.
    """

    bits: int = 4
    method: str = "fastobq"
    order: str | None = None
    symmetric: bool = False
    granularity: str = "channel"
    group_size: int = 128
    kernel_row_grid: str = "row"
    range_search: str = "mse"
    damp: float = 0.1
    damp_mode: str = "absolute"
    block_size: int = 32
    refine_sweeps: int | None = None
    single_row_refine_sweeps: int | None = None
    obq_memory_mb: float = 1024.0
    calibration: str = "one_pass"
    calib_samples: int = 2048
    forward_batch: int | None = None
    hessian_memory_mb: float = 4096.0
    position_fraction: float = 1.0
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    layer_types: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")
    bn_mode: str = "auto"
    reestimate_bn: bool | None = None
    bn_holdout: float = 0.25
    bn_holdout_samples: int = 256
    progress: bool = True
    budget: float | None = None
    budget_mb: float | None = None
    candidate_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    pin: dict[str, int] = field(default_factory=dict)
    sensitivity_samples: int = 256
    gains: str = "auto"

    def __post_init__(self) -> None:
        _check_number("bits", self.bits, 2, 8, integer=True)
        _check_choice("method", self.method, METHODS)
        if self.order is None:
            self.order = DEFAULT_ORDER[self.method]
        elif self.method == "fastobq":
            _check_choice("order", self.order, ORDERS)
        elif self.method == "gptq":
            _check_choice("order", self.order, GPTQ_ORDERS)
        else:
            raise ValueError(f"QuantConfig.order={self.order!r} has no meaning for method={self.method!r}")
        for name in ("symmetric", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"QuantConfig.{name} must be a bool, got {getattr(self, name)!r}")
        self._check_batchnorm()
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_number("group_size", self.group_size, 1, 1 << 30, integer=True)
        _check_choice("kernel_row_grid", self.kernel_row_grid, KERNEL_ROW_GRIDS)
        _check_choice("range_search", self.range_search, RANGE_SEARCHES)
        _check_number("damp", self.damp, 0.0, float("inf"))
        _check_choice("damp_mode", self.damp_mode, DAMP_MODES)
        _check_number("block_size", self.block_size, 1, 1 << 20, integer=True)
        for name, defaults in (("refine_sweeps", DEFAULT_REFINE_SWEEPS),
                               ("single_row_refine_sweeps", DEFAULT_SINGLE_ROW_REFINE_SWEEPS)):
            if getattr(self, name) is None:
                setattr(self, name, defaults[self.method])
            _check_number(name, getattr(self, name), 0, 1000, integer=True)
            if getattr(self, name) and self.method not in REFINING_METHODS:
                raise ValueError(f"QuantConfig.{name}={getattr(self, name)!r} has no meaning for "
                                 f"method={self.method!r} (only fastobq and gptq refine)")
        _check_number("obq_memory_mb", self.obq_memory_mb, 1.0, float("inf"))
        _check_choice("calibration", self.calibration, CALIBRATION_MODES)
        _check_number("calib_samples", self.calib_samples, 1, 1 << 40, integer=True)
        if self.forward_batch is not None:
            _check_number("forward_batch", self.forward_batch, 1, 1 << 40, integer=True)
        _check_number("hessian_memory_mb", self.hessian_memory_mb, 1.0, float("inf"))
        _check_number("position_fraction", self.position_fraction, 0.0, 1.0)
        if self.position_fraction == 0:
            raise ValueError("QuantConfig.position_fraction must be above 0 (it is the share of positions used)")
        self.include = self._patterns("include", self.include)
        self.exclude = self._patterns("exclude", self.exclude)
        self.layer_types = self._patterns("layer_types", self.layer_types)
        for kind in self.layer_types:
            _check_choice("layer_types", kind, list(LAYER_TYPES))
        self._check_mixed_precision()

    def _check_batchnorm(self) -> None:
        if self.reestimate_bn is not None:
            if not isinstance(self.reestimate_bn, bool):
                raise TypeError(f"QuantConfig.reestimate_bn must be a bool or None, got {self.reestimate_bn!r}")
            legacy = "reestimate" if self.reestimate_bn else "keep"
            if self.bn_mode not in ("auto", legacy):
                raise ValueError(f"QuantConfig.reestimate_bn={self.reestimate_bn} contradicts "
                                 f"bn_mode={self.bn_mode!r}: set only bn_mode")
            self.bn_mode, self.reestimate_bn = legacy, None
        _check_choice("bn_mode", self.bn_mode, BN_MODES)
        _check_number("bn_holdout", self.bn_holdout, 0.0, 1.0)
        if not 0 < self.bn_holdout < 1:
            raise ValueError(f"QuantConfig.bn_holdout={self.bn_holdout!r} must be strictly between 0 and 1")
        _check_number("bn_holdout_samples", self.bn_holdout_samples, 1, 1 << 40, integer=True)

    def _check_mixed_precision(self) -> None:
        if isinstance(self.candidate_bits, int) or not isinstance(self.candidate_bits, Sequence):
            raise TypeError(f"QuantConfig.candidate_bits must be a sequence of ints, got {self.candidate_bits!r}")
        if not self.candidate_bits:
            raise ValueError("QuantConfig.candidate_bits is empty")
        for b in self.candidate_bits:
            _check_number("candidate_bits", b, 2, 8, integer=True)
        self.candidate_bits = tuple(sorted(set(self.candidate_bits)))
        if not isinstance(self.pin, dict):
            raise TypeError(f"QuantConfig.pin must be a dict {{pattern: bits}}, got {self.pin!r}")
        for pattern, b in self.pin.items():
            if not isinstance(pattern, str):
                raise TypeError(f"QuantConfig.pin keys must be name patterns (str), got {pattern!r}")
            _check_number(f"pin[{pattern!r}]", b, 2, 8, integer=True)
        _check_number("sensitivity_samples", self.sensitivity_samples, 1, 1 << 40, integer=True)
        _check_choice("gains", self.gains, GAIN_METHODS)
        if self.budget is not None and self.budget_mb is not None:
            raise ValueError("QuantConfig.budget and QuantConfig.budget_mb are exclusive: set one")
        if self.budget is not None:
            _check_number("budget", self.budget, min(self.candidate_bits), max(self.candidate_bits))
        if self.budget_mb is not None:
            _check_number("budget_mb", self.budget_mb, 0.0, float("inf"))
        if self.mixed_precision and self.calibration != "one_pass":
            raise ValueError("QuantConfig.budget needs calibration='one_pass' (layers are sized together)")

    @property
    def mixed_precision(self) -> bool:
        """Whether a size budget asks for per-layer bit widths."""
        return self.budget is not None or self.budget_mb is not None

    @staticmethod
    def _patterns(name: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
            raise TypeError(f"QuantConfig.{name} must be a string or a sequence of strings, got {value!r}")
        return tuple(value)

    @property
    def module_types(self) -> tuple[type[nn.Module], ...]:
        """The `nn.Module` classes selected by `layer_types`."""
        return tuple(LAYER_TYPES[k] for k in self.layer_types)

    def for_layer(self, module: nn.Module) -> QuantConfig:
        """This config with ``module``'s own grid: the per-row one (`kernel_row_grid`) for a conv whose output
        channels each see few input channels (a depthwise conv, an image stem).

        `quantize_model` solves such a layer on both grids and keeps the lower layer objective
        (`lightning_obq.model.quantize.layer_configs`)."""
        convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        if self.kernel_row_grid != "row" or self.granularity == "tensor" or not isinstance(module, convs):
            return self
        row = module.kernel_size[-1]
        per_channel = module.weight[0].numel()  # the weights of one output channel
        if module.in_channels // module.groups > ROW_GRID_MAX_INPUTS or not 1 < row < per_channel:
            return self
        if self.granularity == "group" and self.group_size <= row:
            return self
        return self.replace(granularity="group", group_size=row)

    def replace(self, **changes: Any) -> QuantConfig:
        """A validated copy with some fields changed (the order is re-derived when the method changes)."""
        if "method" in changes and "order" not in changes:
            changes["order"] = None
        for name in ("refine_sweeps", "single_row_refine_sweeps"):
            if "method" in changes and name not in changes:
                changes[name] = None
        if "reestimate_bn" in changes and "bn_mode" not in changes:
            changes["bn_mode"] = "auto"  # the older spelling decides
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view of every field."""
        out = dataclasses.asdict(self)
        for key in ("include", "exclude", "layer_types", "candidate_bits"):
            out[key] = list(out[key])
        return out
