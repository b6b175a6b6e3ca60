"""The gamma ablation as a Pareto picture: ``cspify sweep --data`` on the cached ResNet-like
original of ``accuracy.py --ablations`` (seed 0, 20,000 training images); writes SWEEP.png and
SWEEP.md beside ACCURACY-ablations.md.

    python benchmarks/sweep_picture.py        # about 2 minutes on 2 cores, after accuracy.py --ablations

Each point is calibrated on Fashion-MNIST's training images and scored on its 10,000 test
images; flops, and single-thread batch-1 latency, beside top-1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy as A  # noqa: E402
from accuracy_models import build  # noqa: E402


def main() -> None:
    args = A.parse(["--ablations"])
    data = A.open_benchmark_data(args.data, args.train_subset, None)
    model = build("resnet", channels=data.channels, num_classes=data.num_classes)
    weights = A.cache_path(model, "resnet", "original", 0, args.epochs, args.batch_size, data)
    if not weights.exists():
        sys.exit(f"sweep_picture.py: no cached original at {weights}: run python benchmarks/accuracy.py --ablations first")
    command = ["cspify", "sweep", f"{HERE / 'accuracy_models.py'}:ResNet", "--weights", str(weights),
               "--data", args.data, "--mean", "data", "--gammas", "0.25,0.5,0.75", "--hidden", "keep,scale",
               "--latency", "--threads", "1", "--min-run-time", "0.3", "--force",
               "--plot", str(A.ROOT / "SWEEP.png"), "--markdown", str(A.ROOT / "SWEEP.md")]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
