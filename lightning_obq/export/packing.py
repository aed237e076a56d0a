"""Dense bit packing of integer weight codes into bytes, and back, exactly.

Codes of ``bits`` bits (1..8) are laid out as one little-endian bit stream along the last dimension:
code ``i`` of a row occupies bits ``[i * bits, (i + 1) * bits)``, least significant bit first, and
each row is padded with zero bits to a whole byte. For 4 bits this is the ONNX ``UINT4`` layout (first
element in the low nibble), so packed 4-bit codes go into ONNX initializers unchanged. Both directions
are vectorised: the only Python loops run over the ``bits`` bit positions, never over elements.
"""

from __future__ import annotations

import torch

MAX_BITS = 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} must be an int in [1, {MAX_BITS}]")


def packed_size(n: int, bits: int) -> int:
    """Bytes holding ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    _check_bits(bits)
    return -(-n * bits // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any integer dtype, values in ``[0, 2^bits)``) along the last dim into uint8.

    The result has the leading shape of ``codes`` and ``packed_size(codes.shape[-1], bits)`` bytes per
    row. To pack a whole tensor with padding only at its very end, pass ``codes.reshape(-1)``.
    """
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype.is_complex:
        raise TypeError(f"codes must be an integer torch.Tensor, got {getattr(codes, 'dtype', type(codes))}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits, "
                         f"got [{int(codes.min())}, {int(codes.max())}]")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous().clone()
    *lead, n = codes.shape
    pad = (-n) % 8
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*lead, pad)], dim=-1)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, shift and OR them in
        per = 8 // bits
        grouped = codes.reshape(*lead, -1, per)
        out = grouped[..., 0].clone()
        for j in range(1, per):
            out |= grouped[..., j] << (j * bits)
        return out[..., : packed_size(n, bits)].contiguous()
    # 8 codes of `bits` bits fill exactly `bits` bytes: expand codes to bits, regroup the bits by byte.
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = (codes.reshape(*lead, -1, 8, 1) >> shifts) & 1  # [..., k, 8, bits], LSB first
    stream = stream.reshape(*lead, -1, bits, 8)  # [..., k bytes-groups, bits bytes, 8 bits each]
    out = torch.zeros(stream.shape[:-1], dtype=torch.uint8, device=codes.device)
    for j in range(8):
        out |= stream[..., j] << j
    return out.reshape(*lead, -1)[..., : packed_size(n, bits)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes`: ``n`` uint8 codes per row from packed uint8 rows."""
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 torch.Tensor, got {getattr(packed, 'dtype', type(packed))}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension")
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"packed rows hold {packed.shape[-1]} bytes, but {n} codes of {bits} bits need "
                         f"{packed_size(n, bits)}")
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        out = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return out.reshape(*packed.shape[:-1], -1)[..., :n].contiguous()
    *lead, m = packed.shape
    pad = (-m) % bits
    if pad:
        packed = torch.cat([packed, packed.new_zeros(*lead, pad)], dim=-1)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = (packed.reshape(*lead, -1, bits, 1) >> shifts) & 1  # [..., k, bits bytes, 8 bits]
    stream = stream.reshape(*lead, -1, 8, bits)  # [..., k, 8 codes, bits each]
    out = torch.zeros(stream.shape[:-1], dtype=torch.uint8, device=packed.device)
    for j in range(bits):
        out |= stream[..., j] << j
    return out.reshape(*lead, -1)[..., :n].contiguous()
