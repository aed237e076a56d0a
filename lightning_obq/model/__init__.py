"""Quantizing a whole ``nn.Module``: calibration and Hessian capture, the layer loop, BatchNorm, mixed
precision, output fidelity and the report. Builds on `lightning_obq.core` only; needs torch alone."""
