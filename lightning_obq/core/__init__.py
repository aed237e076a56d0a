"""The quantization maths on plain tensors: grids, Hessians, the layer solvers and their compiled kernels.

Imports nothing else of the package: `quantize_layer` solves one layer from its weight and Hessian; the
model pipeline (`lightning_obq.model`) builds on it.
"""
