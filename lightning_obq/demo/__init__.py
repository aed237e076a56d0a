"""The demo's data sets, models and training (the ``[demo]`` extra): what the ``lightning-obq`` command and
the benchmarks train and quantize. The library (`core`, `model`, `export`, `integrations`) never imports it."""

from lightning_obq.extras import require_extra

require_extra("demo", "lightning_obq.demo")
