"""A converted YOLO trained inside ultralytics against the original, written to the
"## Detector training" section of BENCHMARKS.md (the rest of the file is left as it is).

    python benchmarks/detector_training.py             # 19 minutes on 2 CPU cores, the originals cached
    python benchmarks/detector_training.py --seeds 1 --epochs 4 --tune-epochs 1 --out -   # a quick look

Data: a YOLO-format dataset of Fashion-MNIST items (the training images of
/usr/share/datasets/fashion-mnist) pasted onto 160x160 canvases, one to three per canvas
(``cspify.integrations.yolo_data.write_pasted``), written once under benchmarks/.cache/.
Model: ultralytics' ``yolov3.yaml`` (Darknet backbone, five-conv neck, Detect head) at
``width_multiple``/``depth_multiple`` WIDTH/DEPTH, 10 classes, so that it trains on a CPU.

Per seed:
1. the original is trained E epochs from scratch with ultralytics' trainer (cached);
2. "original": that model trained T epochs more, the same way;
3. "converted": ``cspify.convert`` of the E-epoch model (gamma 0.5, the defaults), calibrated
   on the training canvases (``cspify.calibrate``), saved with
   ``cspify.integrations.ultralytics.save`` and trained the same T epochs with its
   ``Trainer``.

mAP50 on the validation canvases after each step (ultralytics' validator), mean and std
over the seeds; fvcore flops (``cspify.compare``) and single-thread batch-1 CPU latency
(``cspify.benchmark``) of both models at 1x3x160x160.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # before anything imports ultralytics: no network
os.environ.setdefault("YOLO_VERBOSE", "0")

import numpy as np
import torch
from tabulate import tabulate

import cspify
from cspify.integrations import ultralytics as csp_yolo
from common import write_section
from cspify.data import open_data
from cspify.integrations.yolo_data import write_pasted
from cspify.load import import_ultralytics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache" / "detector_training"
FASHION = Path("/usr/share/datasets/fashion-mnist")
NAMES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
SIZE, WIDTH, DEPTH = 160, 0.25, 0.33
BEGIN, END = "<!-- detector_training.py: begin -->", "<!-- detector_training.py: end -->"
ultralytics = import_ultralytics()
from ultralytics.nn.tasks import DetectionModel, yaml_model_load  # noqa: E402


def dataset(train: int, val: int) -> Path:
    folder = CACHE / f"fashion-pasted-{SIZE}-{train}-{val}"
    if not (folder / "data.yaml").exists():
        train_split = open_data(FASHION).train  # the IDX files' uint8 images, N x 1 x 28 x 28
        items = train_split.images[:, 0].numpy()
        CACHE.mkdir(parents=True, exist_ok=True)
        write_pasted(folder, items, train_split.labels.numpy(), NAMES, train=train, val=val, size=SIZE, seed=0)
    return folder / "data.yaml"


def canvases(data_yaml: Path, count: int) -> torch.Tensor:
    """The first ``count`` training canvases as ultralytics feeds them: RGB in [0, 1]."""
    from PIL import Image

    files = sorted((data_yaml.parent / "images" / "train").iterdir())[:count]
    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]
                       ).float() / 255


def build(seed: int) -> DetectionModel:
    cfg = yaml_model_load("yolov3.yaml")
    cfg.update(width_multiple=WIDTH, depth_multiple=DEPTH, nc=len(NAMES))
    torch.manual_seed(seed)
    return DetectionModel(cfg, verbose=False)


def train(weights: Path, data: Path, epochs: int, seed: int, name: str, trainer=None) -> Path:
    """Train the checkpoint ``weights`` for ``epochs`` (ultralytics' defaults otherwise); its last.pt."""
    run = CACHE / "runs" / name
    last = run / "weights" / "last.pt"
    yolo = ultralytics.YOLO(str(weights))
    yolo.train(data=str(data), epochs=epochs, imgsz=SIZE, device="cpu", batch=16, workers=2, seed=seed, plots=False,
               project=str(run.parent), name=run.name, exist_ok=True, val=False, **({"trainer": trainer} if trainer else {}))
    return last


def map50(weights: Path, data: Path) -> float:
    metrics = ultralytics.YOLO(str(weights)).val(data=str(data), imgsz=SIZE, device="cpu", batch=16, workers=2,
                                                   plots=False, project=str(CACHE / "runs"), name="val", exist_ok=True)
    return float(metrics.box.map50)


def one_seed(seed: int, data: Path, epochs: int, tune: int, images: torch.Tensor) -> dict:
    start = CACHE / f"seed{seed}-init.pt"
    if not start.exists():
        yolo = ultralytics.YOLO("yolov3.yaml", verbose=False)
        yolo.model = build(seed)
        yolo.save(str(start))
    teacher = CACHE / f"seed{seed}-E{epochs}.pt"
    if not teacher.exists():
        Path(train(start, data, epochs, seed, f"seed{seed}-teacher")).replace(teacher)
    row = {"teacher": map50(teacher, data)}
    row["original"] = map50(train(teacher, data, tune, seed, f"seed{seed}-original"), data)
    original = ultralytics.YOLO(str(teacher)).model.float().eval()
    x = torch.zeros(1, 3, SIZE, SIZE)
    csp = cspify.convert(original, x)
    cspify.calibrate(original, csp, images)
    saved = csp_yolo.save(csp, CACHE / f"seed{seed}-E{epochs}-csp.pt")
    row["calibrated"] = map50(saved, data)
    tuned = train(saved, data, tune, seed, f"seed{seed}-converted", trainer=csp_yolo.Trainer)
    row["converted"] = map50(tuned, data)
    if seed == 0:
        report = cspify.compare(original, csp, x)
        row["flops"] = (report.original.flops, report.converted.flops)
        row["params"] = (report.original.params, report.converted.params)
        timing = cspify.benchmark(original, csp.eval(), x, rounds=5)
        row["latency"] = (timing.rows[0].original.median_ms, timing.rows[0].converted.median_ms)
    return row


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def section(rows: list[dict], args, seconds: float) -> str:
    first = rows[0]
    table = [
        ["original, E epochs (the teacher)", mean_std([r["teacher"] for r in rows]), "", ""],
        ["converted, calibrated (before training)", mean_std([r["calibrated"] for r in rows]), "", ""],
        [f"original, E + {args.tune_epochs} epochs", mean_std([r["original"] for r in rows]),
         f"{first['flops'][0] / 1e9:.2f}G", f"{first['latency'][0]:.1f} ms"],
        [f"converted, E + {args.tune_epochs} epochs", mean_std([r["converted"] for r in rows]),
         f"{first['flops'][1] / 1e9:.2f}G", f"{first['latency'][1]:.1f} ms"],
    ]
    gap = statistics.mean(r["converted"] - r["original"] for r in rows)
    lines = [
        BEGIN, "## Detector training", "",
        f"Generated by `python benchmarks/detector_training.py --seeds {args.seeds} --epochs {args.epochs} "
        f"--tune-epochs {args.tune_epochs}` on {time.strftime('%Y-%m-%d %H:%M')} in {seconds:.0f} s: torch "
        f"{torch.__version__}, ultralytics {ultralytics.__version__}, {platform.machine()}, {os.cpu_count()} cores.",
        "",
        f"ultralytics' `yolov3.yaml` at width {WIDTH} and depth {DEPTH} (10 classes), trained with ultralytics' own "
        f"trainer and validator on Fashion-MNIST items pasted onto {SIZE}x{SIZE} canvases ({args.train} training and "
        f"{args.val} validation canvases, `cspify.integrations.yolo_data`). The original is trained E = {args.epochs} "
        f"epochs from scratch; then the original and its conversion (gamma 0.5, the defaults, calibrated on "
        f"{args.calibration} training canvases) each train {args.tune_epochs} epochs more "
        "(`YOLO(path).train(..., trainer=cspify.integrations.ultralytics.Trainer)` for the conversion). mAP50 on "
        f"the validation canvases, mean ± std over {args.seeds} seeds (the seed of the initial weights and of "
        "ultralytics' trainer); fvcore flops and single-thread batch-1 CPU latency (`cspify.benchmark`, median) "
        f"at 1x3x{SIZE}x{SIZE}, seed 0.",
        "",
        tabulate(table, headers=["model", "mAP50 (%)", "flops", "CPU latency"], tablefmt="github"),
        "",
        f"Converted minus original after the same {args.tune_epochs} epochs: {100 * gap:+.1f} mAP50 points on the "
        f"mean; flops {100 * (first['flops'][1] / first['flops'][0] - 1):+.1f}%, params "
        f"{100 * (first['params'][1] / first['params'][0] - 1):+.1f}%, latency "
        f"{100 * (first['latency'][1] / first['latency'][0] - 1):+.1f}%.",
        "", "Per seed (mAP50, %): " + "; ".join(
            f"seed {i}: teacher {100 * r['teacher']:.1f}, calibrated {100 * r['calibrated']:.1f}, original "
            f"{100 * r['original']:.1f}, converted {100 * r['converted']:.1f}" for i, r in enumerate(rows)) + ".",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20, help="E: the original's epochs from scratch [20]")
    parser.add_argument("--tune-epochs", type=int, default=5, help="T: the epochs both train after [5]")
    parser.add_argument("--train", type=int, default=384, help="training canvases [384]")
    parser.add_argument("--val", type=int, default=128, help="validation canvases [128]")
    parser.add_argument("--calibration", type=int, default=256, help="canvases calibration reads [256]")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="file whose section to write; - prints it")
    args = parser.parse_args()
    began = time.time()
    data = dataset(args.train, args.val)
    images = canvases(data, args.calibration)
    rows = []
    for seed in range(args.seeds):
        rows.append(one_seed(seed, data, args.epochs, args.tune_epochs, images))
        print(f"seed {seed}: {rows[-1]}", file=sys.stderr, flush=True)
    text = section(rows, args, time.time() - began)
    print(text) if args.out == "-" else write_section(args.out, text, BEGIN, END)


if __name__ == "__main__":
    main()
