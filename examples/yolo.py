"""Quantize an Ultralytics YOLO detector with FastOBQ, end to end, on data that needs no download.

1. Build the Fashion-MNIST detection set (real images pasted onto canvases, YOLO format, cached).
2. Train ``yolov8n.yaml`` from scratch for a short CPU run (cached), or use your own ``--weights``/``--data``.
3. Quantize to W6 with `quantize_yolo` (calibration on train images, mAP before/after with ``YOLO.val``).
4. Save a checkpoint ``YOLO(path)`` loads, reload it and predict.
5. Optionally (``--callback``): the same as an Ultralytics ``on_train_end`` callback after ``model.train()``.

    python examples/yolo.py                      # about 5-10 minutes on 2 CPU cores, most of it training
    python examples/yolo.py --weights best.pt --data my/data.yaml --imgsz 640 --bits 4
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # this example never needs the network

from lightning_obq.demo.data import cache_dir  # noqa: E402
from lightning_obq.demo.detection_data import DetectionSetSpec, build_detection_dataset  # noqa: E402
from lightning_obq.demo.detector import train_detector  # noqa: E402
from lightning_obq.integrations.ultralytics import (  # noqa: E402
    obq_callback,
    quantize_yolo,
    read_recipe,
    save_quantized_yolo,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", help="a trained YOLO detection .pt (default: train yolov8n here)")
    p.add_argument("--data", help="its data.yaml (default: the Fashion-MNIST detection set)")
    p.add_argument("--model", default="yolov8n.yaml", help="model yaml to train when --weights is not given")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--method", default="fastobq", choices=["fastobq", "gptq", "obq", "rtn"])
    p.add_argument("--calib-images", type=int, default=128)
    p.add_argument("--out", default="yolo-quantized.pt")
    p.add_argument("--wandb", action="store_true", help="log to W&B (offline)")
    p.add_argument("--callback", action="store_true", help="also show the on_train_end callback (1-epoch run)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # The same folders as benchmarks/yolo.py, so the set is generated and yolov8n trained once for both.
    shared = cache_dir() / "yolo-bench"
    data = Path(args.data) if args.data else build_detection_dataset(shared / "data", DetectionSetSpec())
    runs = shared / "runs"
    weights = Path(args.weights) if args.weights else train_detector(
        args.model, data, cache=runs, epochs=args.epochs, imgsz=args.imgsz)
    print(f"data {data}\nweights {weights}")

    yolo, report = quantize_yolo(str(weights), data=data, bits=args.bits, method=args.method,
                                 calib_images=args.calib_images, imgsz=args.imgsz, wandb=args.wandb)
    print(report.table())
    m = report.metrics
    print(f"\nmAP50-95 FP {m['fp/mAP50-95']:.4f} -> W{args.bits} {m['quant/mAP50-95']:.4f}; "
          f"mAP50 FP {m['fp/mAP50']:.4f} -> W{args.bits} {m['quant/mAP50']:.4f}")

    path = save_quantized_yolo(yolo, args.out, report)
    from ultralytics import YOLO

    reloaded = YOLO(str(path))
    image = next((data.parent / "images" / "val").glob("*.png"))
    result = reloaded.predict(str(image), imgsz=args.imgsz, verbose=False)[0]
    names = [result.names[int(c)] for c in result.boxes.cls]
    print(f"\nsaved {path} (recipe: {read_recipe(path)['config']['method']} W{read_recipe(path)['config']['bits']}); "
          f"reloaded, predicted {len(result.boxes)} boxes on {image.name}: {names}")

    if args.callback:
        model = YOLO(args.model)
        callback = obq_callback(bits=args.bits, method=args.method, calib_images=32)
        model.add_callback("on_train_end", callback)
        model.train(data=str(data), epochs=1, imgsz=args.imgsz, device="cpu", amp=False, plots=False, workers=0,
                    project=str(runs), name="callback-demo", exist_ok=True)
        print(f"\ncallback: quantized {callback.path}: {callback.report.metrics}")


if __name__ == "__main__":
    main()
