"""Run cspify over whole model zoos and write the matrix to benchmarks/ZOO.md.

    python benchmarks/zoo.py                       # every torchvision classifier, the timm list, the detectors
    python benchmarks/zoo.py --zoo timm            # one zoo (torchvision, timm or detectors)
    python benchmarks/zoo.py resnet50 timm:dla34   # some models
    python benchmarks/zoo.py torchvision:retinanet_resnet50_fpn@backbone   # only a submodule: scope=
    python benchmarks/zoo.py --out /tmp/zoo.md

For every model, at gamma 0.5: convert, then check that it is a drop-in replacement
(``cspify.verify``: output shapes unchanged, forward and backward in train and eval mode,
the converted model traces again), that the user's model is untouched, and that fvcore
flops are not higher than before.
Status "ok" means converted and every check passed; "no stage" means cspify found nothing
to convert and said so with its documented error; "error" rows are defects.

``MODEL@SCOPE`` converts only the submodule at SCOPE (``cspify.convert(..., scope=SCOPE)``),
as for a torchvision detector's backbone (body and FPN) or its head. The drop-in checks and
the flops then run on that submodule, fed what it receives inside the whole model
(``cspify.trace.capture_inputs``): a detector's own outputs are boxes whose number depends
on the scores, and it trains only with targets, so it cannot be checked whole; that the
whole model still runs with the converted part in place, ``convert`` checks itself.
Detectors are built here with ``weights_backbone=None`` (``cspify.load`` passes only
``weights=None``, and their backbone would be downloaded) and resize their two 3xSxS images
to S (``min_size=max_size=S``) instead of 800.

The timm list has one model from every module of ``timm.models`` (timm/models/*.py) that
is a CNN or a convolutional hybrid. The rule: a module is in when its models have spatial
convolutions (kernel larger than stride, depthwise ones included) or pooling that do feature
work inside their stages: a CNN's stages, conv stages or conv blocks beside attention blocks
(CoAtNet, MobileViT, TinyViT, GC ViT's global query generator), or convs inside the attention
or MLP blocks themselves (PVTv2's depthwise MLP conv, XCiT's local patch interaction,
DaViT's and CoaT's conv position encodings, MViTv2's pooling convs). A module is out
(``LEFT_OUT``, with why) when its only convolutions are patchifying ones (kernel = stride:
patch embedding, patch merging, attention's key/value reduction), a conv stem, downsampling
between stages or one position-encoding conv per stage, or 1x1 convs that stand in for
linears. Per module the model is a small, common one, the one the old list had where it
was the natural representative; it runs at 64x64 unless it needs more (``SIZE``).
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import torch
from common import build
from tqdm import tqdm

import cspify
from cspify.errors import CspifyError, NoStageError
from cspify.measure import measure
from cspify.record import conversion_of
from cspify.trace import capture_inputs
from cspify.verify import drop_in_problems

# Input sizes of the models whose fixed patch, window or attention-bias grids (or whose
# stride-32 3x3 convs) need more than 64x64, by spec prefix; detectors: two SxS images.
SIZE = {
    "torchvision:vit": 224, "torchvision:swin": 224, "torchvision:maxvit": 224, "torchvision:inception_v3": 96,
    "torchvision:googlenet": 64, "torchvision:retinanet_resnet50_fpn": 128,
    "timm:coat_lite_tiny": 224, "timm:coatnet_nano_rw_224": 224, "timm:efficientformer_l1": 224,
    "timm:efficientformerv2_s0": 224, "timm:gcvit_xxtiny": 224, "timm:inception_resnet_v2": 75,
    "timm:inception_v3": 75, "timm:inception_v4": 75, "timm:visformer_tiny": 224,
    "timm:vit_small_r26_s32_224": 224, "timm:vitamin_small_224": 224,
}

# One model per timm module (module -> model); the rule is in the docstring.
TIMM = {
    "byoanet": "lambda_resnet26t",  # BoTNet and HaloNet need 256x256; lambda layers run at any size
    "byobnet": "repvgg_a0",  # RepVGG, which the issue names; resnext26ts would repeat resnet.py's ResNeXt
    "coat": "coat_lite_tiny",  # conv position encodings in every block
    "convmixer": "convmixer_768_32",
    "convnext": "convnext_atto",
    "cpubone": "cpubone_nano",
    "csatv2": "csatv2",
    "cspnet": "cspdarknet53",  # CSPNet's and YOLOv4's backbone: DarkNet blocks in CSP stages
    "cspnext": "cspnext_tiny",
    "davit": "davit_tiny",  # conv position encodings in every block
    "densenet": "densenet121",
    "dla": "dla34",
    "dpn": "dpn68",
    "edgenext": "edgenext_xx_small",
    "efficientformer": "efficientformer_l1",  # pooling (MetaFormer) stages before attention
    "efficientformer_v2": "efficientformerv2_s0",
    "efficientnet": "efficientnet_b0",
    "efficientvim": "efficientvim_m1",
    "efficientvit_mit": "efficientvit_b0",
    "efficientvit_msra": "efficientvit_m0",
    "fasternet": "fasternet_t0",
    "fastvit": "fastvit_t8",
    "focalnet": "focalnet_tiny_srf",  # focal modulation: depthwise convs in every block
    "gcvit": "gcvit_xxtiny",  # MBConv blocks in every stage's global query generator
    "ghostnet": "ghostnet_100",
    "hardcorenas": "hardcorenas_a",
    "hgnet": "hgnetv2_b0",
    "hrnet": "hrnet_w18_small",
    "iformer": "iformer_t",
    "inception_next": "inception_next_atto",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "lcnetv2": "lcnetv2_small",
    "lowformer": "lowformer_b0",
    "mambaout": "mambaout_femto",
    "maxxvit": "coatnet_nano_rw_224",  # CoAtNet: two MBConv stages, then attention
    "metaformer": "poolformer_s12",
    "mobilenetv3": "mobilenetv3_large_100",  # the module's namesake; LCNet's blocks have no residuals
    "mobilenetv5": "mobilenetv5_base",  # the smallest of the module
    "mobilevit": "mobilevit_xxs",
    "mvitv2": "mvitv2_tiny",  # pooling convs in every attention block
    "nasnet": "nasnetalarge",  # the module's only model
    "nextvit": "nextvit_small",
    "nfnet": "nf_resnet50",
    "pnasnet": "pnasnet5large",  # the module's only model
    "pvt_v2": "pvt_v2_b0",  # a depthwise conv in every MLP
    "rdnet": "rdnet_tiny",
    "regnet": "regnety_004",
    "repghost": "repghostnet_100",
    "repvit": "repvit_m1",
    "res2net": "res2net50_14w_8s",
    "resnest": "resnest50d",
    "resnet": "resnet50d",
    "resnetv2": "resnetv2_50",
    "rexnet": "rexnet_100",
    "selecsls": "selecsls42b",
    "senet": "legacy_seresnet18",
    "shvit": "shvit_s1",
    "sknet": "skresnet18",
    "starnet": "starnet_s1",
    "swiftformer": "swiftformer_xs",
    "tiny_vit": "tiny_vit_5m_224",  # an MBConv stage, then attention blocks with a local conv
    "tresnet": "tresnet_m",
    "vgg": "vgg11",
    "visformer": "visformer_tiny",  # 3x3 group convs in the first stage's MLPs
    "vision_transformer_hybrid": "vit_small_r26_s32_224",  # a ResNet-26 with stages before the ViT
    "vitamin": "vitamin_small_224",  # MBConv stages before the ViT
    "vovnet": "vovnet39a",
    "xception": "legacy_xception",
    "xception_aligned": "xception41",
    "xcit": "xcit_nano_12_p16_224",  # local patch interaction: depthwise convs in every block
}

# The timm modules the rule leaves out, and why.
LEFT_OUT = {
    "beit": "ViT: the patch embedding is its only conv",
    "cait": "ViT with class attention: the patch embedding is its only conv",
    "convit": "ViT with gated positional self-attention: the patch embedding is its only conv",
    "crossvit": "two-branch ViT: the patch embeddings are its only convs",
    "deepseek_vit": "ViT vision tower: the patch embedding is its only conv",
    "deit": "ViT: the patch embedding is its only conv",
    "eva": "ViT: the patch embedding is its only conv",
    "gemma4_vit": "ViT vision tower with a linear patch embedding: no conv at all",
    "hiera": "hierarchical ViT that pools tokens by max: the patch embedding is its only conv",
    "hieradet_sam2": "Hiera (SAM 2): the patch embedding is its only conv",
    "levit": "a conv stem, then attention and MLP blocks (levit_conv_* write their linears as 1x1 convs)",
    "mlp_mixer": "MLP-Mixer, ResMLP, gMLP: the patch embedding is their only conv",
    "naflexvit": "ViT with a linear patch embedding: no conv at all",
    "nest": "transformer blocks; a conv and max-pool only between levels",
    "pit": "ViT; a depthwise conv only pools between stages",
    "qwen3_vit": "ViT vision tower: the patch embedding is its only conv",
    "sequencer": "BiLSTM blocks: convs only embed patches and downsample",
    "swin_transformer": "window attention: the patch embedding is its only conv",
    "swin_transformer_v2": "window attention: the patch embedding is its only conv",
    "swin_transformer_v2_cr": "window attention: the patch embedding is its only conv",
    "tnt": "transformer in transformer: the pixel embedding is its only conv",
    "twins": "attention blocks; convs only embed patches, reduce keys (kernel = stride), encode position once a stage",
    "vision_transformer": "ViT: the patch embedding is its only conv",
    "vision_transformer_relpos": "ViT: the patch embedding is its only conv",
    "vision_transformer_sam": "ViT (SAM): the patch embedding is its only conv",
    "volo": "outlook attention (unfold, no conv) and transformer blocks after a conv stem",
}

# Rows that convert a submodule of a torchvision detector (MODEL@SCOPE).
DETECTORS = ["torchvision:retinanet_resnet50_fpn@backbone", "torchvision:retinanet_resnet50_fpn@head",
             "torchvision:retinanet_resnet50_fpn@head.classification_head.conv"]  # the head's shared conv tower


def torchvision_names() -> list[str]:
    import torchvision

    return [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]


def size_of(spec: str) -> int:
    return next((s for prefix, s in SIZE.items() if spec.startswith(prefix)), 64)


def is_detector(spec: str) -> bool:
    import torchvision

    zoo, _, name = spec.partition(":")
    return zoo == "torchvision" and name in torchvision.models.list_models(module=torchvision.models.detection)


def module_of(spec: str) -> str:
    """The file of timm.models (or torchvision.models) that defines the model: 'timm:vovnet39a' -> 'vovnet'."""
    zoo, _, name = spec.partition(":")
    if zoo == "timm":
        import timm

        return next((m for m in timm.list_modules() if timm.models.is_model_in_modules(name, [m])), "")
    import torchvision

    try:
        return torchvision.models.get_model_builder(name).__module__.rpartition(".")[2]
    except ValueError:  # no such model: its row says so
        return ""


def model_and_inputs(spec: str) -> tuple[torch.nn.Module, tuple]:
    """The model (eval mode, seeded random weights) and its example inputs: a 2x3xSxS batch,
    or for a detector a list of two 3xSxS images."""
    size = size_of(spec)
    if not is_detector(spec):
        return build(spec), (torch.randn(2, 3, size, size),)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(
        spec.partition(":")[2], weights=None, weights_backbone=None, min_size=size, max_size=size
    )
    return model.eval(), ([torch.randn(3, size, size) for _ in range(2)],)


def check(spec: str) -> dict:
    name, _, scope = spec.partition("@")
    row = {"model": spec, "module": module_of(name), "found": 0, "converted": 0, "flops": "", "params": "",
           "status": "", "reason": ""}
    start = time.perf_counter()
    model, x = model_and_inputs(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        csp = cspify.convert(model, x, gamma=0.5, scope=scope or None)
    except NoStageError as error:
        row.update(status="no stage", reason=error.message)
        return row
    except CspifyError as error:
        row.update(status="not converted", reason=error.message)
        return row
    # What was converted and what it receives: the whole model, or the submodule at scope.
    original, converted, inputs = model, csp, x
    if scope:
        original, inputs = capture_inputs(model, x, scope)
        converted = csp.get_submodule(scope)
    stages = conversion_of(converted).stages
    row["found"] = len(stages)
    row["converted"] = sum(s.converted for s in stages)
    skipped = [f"{s.name}: {s.reason}" for s in stages if not s.converted]
    problems = drop_in_problems(original, converted, inputs)
    assert not problems, "; ".join(problems)
    current = model.state_dict()
    assert all(torch.equal(state[k], current[k]) for k in state), "the user's model changed"
    before, after = measure(original, inputs).totals, measure(converted, inputs).totals
    assert after.flops <= before.flops, f"flops rose: {before.flops} -> {after.flops}"
    row["flops"] = f"{before.flops / 1e6:.1f}M -> {after.flops / 1e6:.1f}M ({100 * (after.flops - before.flops) / before.flops:+.1f}%)"
    row["params"] = f"{before.params / 1e6:.2f}M -> {after.params / 1e6:.2f}M ({100 * (after.params - before.params) / before.params:+.1f}%)"
    row["status"] = "ok"
    row["reason"] = "; ".join(skipped[:2]) + (f"; +{len(skipped) - 2} more" if len(skipped) > 2 else "")
    row["seconds"] = f"{time.perf_counter() - start:.1f}"
    return row


def unsorted_timm_modules() -> list[str]:
    """timm modules in neither TIMM nor LEFT_OUT (a newer timm has them): sort them by the rule."""
    import timm

    return [m for m in timm.list_modules() if m not in TIMM and m not in LEFT_OUT]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*")
    parser.add_argument("--zoo", choices=["torchvision", "timm", "detectors", "all"], default="all")
    parser.add_argument("--out", default=str(Path(__file__).with_name("ZOO.md")))
    args = parser.parse_args()
    specs = [m if ":" in m else f"torchvision:{m}" for m in args.models]
    if not specs:
        specs = (torchvision_names() if args.zoo in ("torchvision", "all") else []) + (
            [f"timm:{n}" for n in TIMM.values()] if args.zoo in ("timm", "all") else []
        ) + (DETECTORS if args.zoo in ("detectors", "all") else [])
        if args.zoo in ("timm", "all") and unsorted_timm_modules():
            print("timm modules in neither TIMM nor LEFT_OUT:", ", ".join(unsorted_timm_modules()))
    rows, start = [], time.perf_counter()
    for spec in tqdm(specs, desc="zoo", unit="model"):
        try:
            rows.append(check(spec))
        except Exception as error:  # noqa: BLE001 (a defect: record it and go on)
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            rows.append({"model": spec, "module": module_of(spec.partition("@")[0]), "status": "error",
                         "reason": reason, "trace": traceback.format_exc(limit=-3)})
    write(rows, Path(args.out), time.perf_counter() - start)


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def write(rows: list[dict], path: Path, seconds: float) -> None:
    from tabulate import tabulate

    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "no stage", "not converted", "error")}
    groups = {
        "torchvision": lambda m: m.startswith("torchvision:") and "@" not in m,
        "timm": lambda m: m.startswith("timm:"),
        "detectors": lambda m: "@" in m,
    }
    for group, member in groups.items():
        mine = [r for r in rows if member(r["model"])]
        counts[group] = f"{sum(r['status'] == 'ok' for r in mine)} of {len(mine)} converted"
    cols = ["model", "module", "found", "converted", "flops", "params", "status", "reason"]
    cells = [[shorten(str(r.get(c, "")), 180) if c == "reason" else r.get(c, "") for c in cols] for r in rows]
    table = tabulate(cells, headers=cols, tablefmt="github")
    text = (
        "# cspify over the model zoos\n\n"
        f"Generated by `python benchmarks/zoo.py` in {seconds / 60:.1f} minutes "
        f"(torch {torch.__version__}, gamma 0.5, random weights, 2x3x64x64 inputs unless the model needs more; "
        "detectors: two 3x128x128 images, MODEL@SCOPE converts the submodule at SCOPE).\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in counts.items()) + "\n\n" + table + "\n"
    )
    path.write_text(text)
    print(text)
    for r in rows:
        if r["status"] == "error":
            print(r["model"], r.get("trace", ""))


if __name__ == "__main__":
    main()
