"""Run cspify over whole model zoos and write the matrix to benchmarks/ZOO.md.

    python benchmarks/zoo.py                       # every torchvision classifier + the timm list
    python benchmarks/zoo.py --zoo torchvision     # one zoo
    python benchmarks/zoo.py resnet50 timm:dla34   # some models
    python benchmarks/zoo.py --out /tmp/zoo.md

For every model, at gamma 0.5: convert, then check that it is a drop-in replacement
(``cspify.verify``: output shapes unchanged, forward and backward in train and eval mode,
the converted model traces again), that the user's model is untouched, and that fvcore
flops are not higher than before.
Status "ok" means converted and every check passed; "no stage" means cspify found nothing
to convert and said so with its documented error; "error" rows are defects.
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

import cspify
from common import build
from cspify.errors import CspifyError, NoStageError
from cspify.measure import measure
from cspify.record import conversion_of
from cspify.verify import drop_in_problems

# Models whose fixed patch or window grids need this input size; the rest run at 64x64.
SIZE = {"vit": 224, "swin": 224, "maxvit": 224, "inception_v3": 96, "googlenet": 64}

TIMM = [
    # ResNet family and its variants
    "resnet18", "resnet50d", "resnet26t", "resnext50_32x4d", "seresnext26d_32x4d", "ecaresnet50d", "skresnet18",
    "resnest50d", "res2net50_14w_8s", "res2next50", "resnetv2_50", "resnetv2_50x1_bit", "tresnet_m", "nf_resnet50",
    "wide_resnet50_2", "resnetrs50", "gcresnet33ts", "resnext26ts", "gernet_s", "repvgg_a0",
    # RegNet
    "regnetx_002", "regnety_004", "regnetz_005",
    # Inverted residuals (MobileNet / EfficientNet / NAS families)
    "efficientnet_b0", "efficientnet_lite0", "tf_efficientnetv2_b0", "mobilenetv2_100", "mobilenetv3_small_100",
    "mobilenetv3_large_100", "mnasnet_100", "spnasnet_100", "semnasnet_075", "fbnetc_100", "mixnet_s",
    "hardcorenas_a", "tinynet_a", "lcnet_050", "ghostnet_100", "rexnet_100",
    # ConvNeXt and friends
    "convnext_atto", "convnextv2_atto", "convmixer_768_32", "poolformer_s12",
    # Dense and aggregation families
    "densenet121", "densenetblur121d", "dla34", "dla46_c", "dla60", "dpn68", "vovnet39a", "ese_vovnet19b_dw",
    "hrnet_w18_small", "selecsls42b",
    # DarkNet and CSP
    "darknet53", "cspdarknet53", "cspresnet50", "cspresnext50", "cs3darknet_s",
    # others
    "xception41", "inception_v3", "vgg11",
]


def torchvision_names() -> list[str]:
    import torchvision

    return [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]


def size_of(spec: str) -> int:
    name = spec.partition(":")[2]
    return next((s for prefix, s in SIZE.items() if name.startswith(prefix)), 64)


def check(spec: str) -> dict:
    row = {"model": spec, "found": 0, "converted": 0, "flops": "", "params": "", "status": "", "reason": ""}
    start = time.perf_counter()
    model = build(spec)
    x = torch.randn(2, 3, size_of(spec), size_of(spec))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        csp = cspify.convert(model, x, gamma=0.5)
    except NoStageError as error:
        row.update(status="no stage", reason=error.message)
        return row
    except CspifyError as error:
        row.update(status="not converted", reason=error.message)
        return row
    stages = conversion_of(csp).stages
    row["found"] = len(stages)
    row["converted"] = sum(s.converted for s in stages)
    skipped = [f"{s.name}: {s.reason}" for s in stages if not s.converted]
    problems = drop_in_problems(model, csp, x)
    assert not problems, "; ".join(problems)
    current = model.state_dict()
    assert all(torch.equal(state[k], current[k]) for k in state), "the user's model changed"
    before, after = measure(model, x).totals, measure(csp, x).totals
    assert after.flops <= before.flops, f"flops rose: {before.flops} -> {after.flops}"
    row["flops"] = f"{before.flops / 1e6:.1f}M -> {after.flops / 1e6:.1f}M ({100 * (after.flops - before.flops) / before.flops:+.1f}%)"
    row["params"] = f"{before.params / 1e6:.2f}M -> {after.params / 1e6:.2f}M ({100 * (after.params - before.params) / before.params:+.1f}%)"
    row["status"] = "ok"
    row["reason"] = "; ".join(skipped[:2]) + (f"; +{len(skipped) - 2} more" if len(skipped) > 2 else "")
    row["seconds"] = f"{time.perf_counter() - start:.1f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*")
    parser.add_argument("--zoo", choices=["torchvision", "timm", "all"], default="all")
    parser.add_argument("--out", default=str(Path(__file__).with_name("ZOO.md")))
    args = parser.parse_args()
    specs = [m if ":" in m else f"torchvision:{m}" for m in args.models]
    if not specs:
        specs = (torchvision_names() if args.zoo in ("torchvision", "all") else []) + (
            [f"timm:{n}" for n in TIMM] if args.zoo in ("timm", "all") else []
        )
    rows, start = [], time.perf_counter()
    for spec in tqdm(specs, desc="zoo", unit="model"):
        try:
            rows.append(check(spec))
        except Exception as error:  # a defect: record it and go on
            rows.append({"model": spec, "status": "error", "reason": f"{type(error).__name__}: {error}".splitlines()[0][:300],
                         "trace": traceback.format_exc(limit=-3)})
    write(rows, Path(args.out), time.perf_counter() - start)


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def write(rows: list[dict], path: Path, seconds: float) -> None:
    from tabulate import tabulate

    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "no stage", "not converted", "error")}
    for zoo in ("torchvision", "timm"):
        mine = [r for r in rows if r["model"].startswith(zoo)]
        counts[zoo] = f"{sum(r['status'] == 'ok' for r in mine)} of {len(mine)} converted"
    cols = ["model", "found", "converted", "flops", "params", "status", "reason"]
    cell = lambda r, c: shorten(str(r.get(c, "")), 180) if c == "reason" else r.get(c, "")  # noqa: E731
    table = tabulate([[cell(r, c) for c in cols] for r in rows], headers=cols, tablefmt="github")
    text = (
        "# cspify over the model zoos\n\n"
        f"Generated by `python benchmarks/zoo.py` in {seconds / 60:.1f} minutes "
        f"(torch {torch.__version__}, gamma 0.5, random weights, 2x3x64x64 inputs unless the model needs more).\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in counts.items()) + "\n\n" + table + "\n"
    )
    path.write_text(text)
    print(text)
    for r in rows:
        if r["status"] == "error":
            print(r["model"], r.get("trace", ""))


if __name__ == "__main__":
    main()
