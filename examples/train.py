"""Train a model.py from scratch on image data, so that ``cspify finetune`` has a trained
original to start from (the README's fine-tuning example):

    python examples/train.py examples/resnet_like.py --data /usr/share/datasets/fashion-mnist \
        --channels 3 --images 20000 -o trained.pt

Plain cross-entropy, SGD with Nesterov momentum, one-cycle cosine; the images are read in
[0, 1] as cspify reads them by default (no normalisation), so ``cspify finetune`` scores the
trained model on the same inputs. Writes the state_dict that ``--weights`` loads.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cspify.data import check_fits, open_data
from cspify.load import load_model, parse_shape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="MODEL as cspify takes it: path/to/model.py[:Class], torchvision:NAME, timm:NAME")
    p.add_argument("--data", required=True, help="an ImageFolder tree or a folder of IDX files")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="read the images with this many channels")
    p.add_argument("--input-shape", default=None, help="MODEL's example input shape, e.g. 1,3,28,28")
    p.add_argument("--images", type=int, default=20000, help="training images used (a seeded subset; 0: all)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="where to write the trained state_dict")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    data = open_data(args.data, channels=args.channels)
    shape = parse_shape(args.input_shape) if args.input_shape else (1, data.channels, *data.size)
    model = load_model(args.model, shape).model
    check_fits(model, data, args.model)
    total = len(data.train)
    count = min(args.images, total) if args.images else total
    picked = torch.randperm(total, generator=torch.Generator().manual_seed(args.seed))[:count]
    steps = args.epochs * math.ceil(count / args.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    model.train()
    start = time.perf_counter()
    with tqdm(total=steps, desc="training", unit="step") as bar:
        for _ in range(args.epochs):
            order = picked[torch.randperm(count)]
            for i in range(0, count, args.batch_size):
                x, y = data.train.batch(order[i : i + args.batch_size])
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                bar.set_postfix(loss=f"{float(loss):.3f}")
                bar.update(1)
    model.eval()
    correct = seen = 0
    with torch.inference_mode():
        for i in range(0, len(data.val), 1000):
            x, y = data.val.batch(torch.arange(i, min(i + 1000, len(data.val))))
            correct += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    torch.save(model.state_dict(), args.output)
    print(f"trained {args.model} on {count:,} images in {time.perf_counter() - start:.0f}s: "
          f"validation top-1 {100 * correct / seen:.2f}%; wrote {args.output}")


if __name__ == "__main__":
    main()
