"""Real photographs that installed packages ship, cut into crops for calibration and evaluation.

No data is downloaded: the photographs are scikit-image's sample images (``skimage.data``: astronaut,
cat, coffee, rocket, Hubble deep field, tissue, retina, coins, moon, textures, ...) and the two that
Ultralytics ships (``bus.jpg``, ``zidane.jpg``). Calibration crops come from the left half of every
photograph and evaluation crops from the right half, so the two sets never share a pixel.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                  "camera", "coins", "moon", "text", "grass", "gravel", "brick", "clock", "stereo_motorcycle", "cell")
ULTRALYTICS_PHOTOS = ("bus.jpg", "zidane.jpg")
SPLITS = ("calibration", "evaluation")


@cache
def photographs() -> tuple[torch.Tensor, ...]:
    """Every photograph as a float RGB tensor ``[3, H, W]`` in [0, 1] (gray ones repeated on 3 channels)."""
    import skimage.data
    from PIL import Image

    arrays = []
    for name in SKIMAGE_PHOTOS:
        a = getattr(skimage.data, name)()
        arrays.append(a[0] if isinstance(a, tuple) else a)
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    arrays += [np.asarray(Image.open(assets / name).convert("RGB")) for name in ULTRALYTICS_PHOTOS]
    out = []
    for a in arrays:
        a = np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a[..., :3]
        out.append(torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255)
    return tuple(out)


def photo_crops(n: int, seed: int, size: int, split: str = "calibration",
                mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
                ) -> torch.Tensor:
    """``n`` random square crops (side 50-100 % of the half-photo's height or width), resized to ``size``,
    randomly mirrored, normalised with ``mean``/``std``: ``[n, 3, size, size]``. ``split`` picks the half."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
    g = torch.Generator().manual_seed(seed)
    photos = photographs()
    crops = []
    for _ in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=g))]
        half = photo.shape[2] // 2
        photo = photo[:, :, :half] if split == "calibration" else photo[:, :, half:]
        h, w = photo.shape[1:]
        side = int(min(h, w) * (0.5 + 0.5 * float(torch.rand(1, generator=g))))
        y = int(torch.randint(h - side + 1, (1,), generator=g))
        x = int(torch.randint(w - side + 1, (1,), generator=g))
        crop = F.interpolate(photo[None, :, y:y + side, x:x + side], size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)[0]
        crops.append(crop.flip(-1) if float(torch.rand(1, generator=g)) < 0.5 else crop)
    images = torch.stack(crops)
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
