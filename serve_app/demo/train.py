"""Train the demo model `parts@1` from scratch on the synthetic dataset; no downloads.

    YOLO_OFFLINE=1 python -m serve_app.demo.train --epochs 60 --train 300 --val 100 --test 200

Writes the weights (optimizer stripped) to serve_app/demo/weights/parts_v1.pt and the
held-out metrics (a separately seeded generated set, never seen in training) to
serve_app/demo/weights/parts_v1.metrics.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from ultralytics import YOLO

from serve_app.demo.synth import CLASSES, write_dataset

WEIGHTS = Path(__file__).resolve().parent / "weights"
ARCH = "yolov8n.yaml"  # built from the yaml shipped inside ultralytics: random init, nothing fetched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep the dataset and run here")
    ap.add_argument("--init", type=Path, default=None, help="start from these weights instead of random (fine-tune)")
    a = ap.parse_args()

    work = a.work or Path(tempfile.mkdtemp(prefix="parts-train-"))
    data = write_dataset(work / "data", seed=a.seed, train=a.train, val=a.val, size=a.imgsz)
    test = write_dataset(work / "test", seed=a.seed + 1000, train=0, val=a.test, size=a.imgsz)
    t0 = time.time()
    model = YOLO(str(a.init) if a.init else ARCH)
    model.train(
        data=str(data),
        epochs=a.epochs,
        imgsz=a.imgsz,
        batch=a.batch,
        workers=0,
        device="cpu",
        seed=a.seed,
        deterministic=True,
        plots=False,
        amp=False,
        pretrained=False,
        project=str(work / "runs"),
        name="parts",
        exist_ok=True,
        verbose=False,
        patience=max(20, a.epochs // 3),
    )
    train_s = time.time() - t0
    best = work / "runs" / "parts" / "weights" / "best.pt"
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    target = WEIGHTS / "parts_v1.pt"
    shutil.copy(best, target)
    metrics = YOLO(str(target)).val(
        data=str(test),
        imgsz=a.imgsz,
        batch=a.batch,
        device="cpu",
        plots=False,
        split="val",
        verbose=False,
        project=str(work / "runs"),
        name="test",
        exist_ok=True,
    )
    per_class = {
        CLASSES[int(c)]: round(float(m), 4) for c, m in zip(metrics.box.ap_class_index, metrics.box.ap50, strict=True)
    }
    report = {
        "model": "parts",
        "version": 1,
        "arch": ARCH,
        "init": a.init.name if a.init else None,
        "classes": list(CLASSES),
        "imgsz": a.imgsz,
        "epochs": a.epochs,
        "train_images": a.train,
        "val_images": a.val,
        "test_images": a.test,
        "seed": a.seed,
        "test_seed": a.seed + 1000,
        "map50": round(float(metrics.box.map50), 4),
        "map50_95": round(float(metrics.box.map), 4),
        "ap50_per_class": per_class,
        "train_seconds": round(train_s, 1),
        "weights_bytes": target.stat().st_size,
    }
    (WEIGHTS / "parts_v1.metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
