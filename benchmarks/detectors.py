"""cspify on detectors as they come, next to the CSPNet paper's detection statements, written
to the "## Detectors" section of BENCHMARKS.md (the rest of the file is left as it is).

    python benchmarks/detectors.py                    # about 6 minutes on 2 CPU cores
    python benchmarks/detectors.py --out -            # print the section instead
    python benchmarks/detectors.py --size 256

Models, random weights, nothing downloaded, gamma 0.5 and every other option at its default:

- ultralytics' YOLOv3 (``ultralytics:yolov3.yaml``: Darknet-53 backbone, YOLOv3's neck,
  ultralytics' Detect head) at 1x3xSxS, converted whole (the Detect head is kept whole by
  tracing, its conv towers converted on their own), with the defaults, with
  ``pyramid="maxout"``, and at gamma 0.75; YOLOv8n as it comes (its C2f blocks are CSP
  already);
- torchvision's Faster R-CNN and RetinaNet (ResNet-50 FPN), one 3xSxS image resized to S
  (``min_size=max_size=S``), converted with ``scope="backbone"`` (ResNet body and FPN), and
  RetinaNet's ``scope="head"`` (and its shared conv tower alone) as well.

For every conversion, ``cspify.compare`` gives the totals and the stage rows; the measured
part is also split into backbone, neck (FPN) and head by module path (``cspify.measure``,
``Measurement.stage``), so the tables say where the largest layer and the memory traffic
are. A scope cspify does not convert is listed with cspify's own message. The paper's
statements are quoted as issue 13 gives them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # before anything imports ultralytics: no network

import torch
import torchvision
from common import pct as signed
from common import write_section
from tabulate import tabulate

import cspify
from cspify.errors import CspifyError
from cspify.load import load_model
from cspify.measure import Measurement, measure
from cspify.regions import largest_layer, nodes_by_part
from cspify.report import Report, human
from cspify.trace import as_inputs, capture_inputs, ready_to_trace, trace

ROOT = Path(__file__).resolve().parents[1]
GAMMA = 0.5
BEGIN, END = "<!-- detectors.py: begin -->", "<!-- detectors.py: end -->"
# The paper's detection statements (CSPNet, CVPR Workshops 2020), as issue 13 quotes them.
PAPER_BOTTLENECK = "computational bottleneck reduced by 80% on a YOLOv3-based model"
PAPER_PYRAMID = "memory cost of the feature pyramid reduced by 75% (with its Exact Fusion Model)"


# ------------------------------------------------------------------ the models


def ultralytics_model(name: str, backbone_name: str):
    def build(size: int):
        torch.manual_seed(0)
        model = load_model(f"ultralytics:{name}").model
        backbone, last = len(model.yaml["backbone"]), len(model.model) - 1

        def part(path: str) -> str:
            index = int(path.split(".")[1]) if path.startswith("model.") else 0
            if index < backbone:
                return f"backbone ({backbone_name}, model.0-{backbone - 1})"
            return f"neck (model.{backbone}-{last - 1})" if index < last else f"Detect head (model.{last})"

        return model, torch.randn(1, 3, size, size), part
    return build


yolov3 = ultralytics_model("yolov3.yaml", "Darknet-53")


def torchvision_detector(name: str):
    def build(size: int):
        torch.manual_seed(0)
        # cspify.load passes weights=None only: the ResNet-50 backbone weights would be downloaded
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, min_size=size, max_size=size)
        return model.eval(), torch.randn(1, 3, size, size), None
    return build


def body_or_fpn(path: str) -> str:
    return {"body": "ResNet-50 body", "fpn": "FPN"}.get(path.split(".")[0], path.split(".")[0])


def head_part(path: str) -> str:
    return path.split(".")[0]


def tower_part(path: str) -> str:
    return "classification head's conv tower"


# (title, builder, [(scope, parts of the measured module)])
# (title, builder, [(scope, part of a module path)], convert's options)
MODELS = [
    ("YOLOv3 (ultralytics:yolov3.yaml)", yolov3, [(None, None)], {}),
    ("YOLOv3 with --pyramid maxout (ultralytics:yolov3.yaml)", yolov3, [(None, None)], {"pyramid": "maxout"}),
    ("YOLOv8n (ultralytics:yolov8n.yaml)", ultralytics_model("yolov8n.yaml", "CSPDarknet with C2f"), [(None, None)], {}),
    ("Faster R-CNN (torchvision fasterrcnn_resnet50_fpn)", torchvision_detector("fasterrcnn_resnet50_fpn"),
     [("backbone", body_or_fpn)], {}),
    ("RetinaNet (torchvision retinanet_resnet50_fpn)", torchvision_detector("retinanet_resnet50_fpn"),
     [("backbone", body_or_fpn), ("head", head_part), ("head.classification_head.conv", tower_part)], {}),
]


def pct(before: float, after: float) -> str:
    """common.pct, and "-" where there was nothing before (a part with no conv has no CIO)."""
    return signed(before, after) if before else "-"


# ------------------------------------------------------------------ measuring


def measured(model, converted, x, scope) -> tuple[Measurement, Measurement]:
    """The two Measurements ``cspify.compare`` makes (the module at ``scope``, fed what it
    receives inside the whole model), kept for the split into parts."""
    inputs = as_inputs(x)
    original = ready_to_trace(model, inputs)
    if scope:
        original, inputs = capture_inputs(original, inputs, scope)
        converted = converted.get_submodule(scope)
    return measure(original, inputs), measure(converted, inputs)


def kept_whole(model, x, scope) -> str:
    """The submodules torch.fx keeps whole when tracing the module at ``scope``, with why."""
    try:
        part, inputs = capture_inputs(ready_to_trace(model, as_inputs(x)), as_inputs(x), scope)
        kept = trace(part, inputs, ()).kept_whole
    except CspifyError:
        return ""
    return ", ".join(f"`{scope}.{name}` ({why})" for name, why in kept.items())


# ------------------------------------------------------------------ tables


def totals_table(report: Report) -> str:
    o, c = report.original, report.converted
    rows = [[label, human(getattr(o, key), unit), human(getattr(c, key), unit), pct(getattr(o, key), getattr(c, key))]
            for key, label, unit in (("flops", "flops", ""), ("params", "params", ""),
                                     ("memory_bytes", "memory traffic", "B"), ("cio_bytes", "CIO", "B"),
                                     ("peak_bytes", "peak activations", "B"),
                                     ("max_layer_flops", "largest layer (flops)", ""))]
    rows.append(["layer max/mean", f"{o.layer_balance:.2f}", f"{c.layer_balance:.2f}",
                 pct(o.layer_balance, c.layer_balance)])
    return tabulate(rows, headers=["total", "before", "after", "change"], tablefmt="github",
                    colalign=("left", "right", "right", "right"), disable_numparse=True)


def stages_table(report: Report) -> str:
    rows = []
    for row in report.stages:
        b, a = row.before, row.after
        if not row.converted:
            rows.append([row.name, row.kind, f"-/{row.channels}", f"not converted: {row.reason}", *[""] * 7])
            continue
        rows.append([
            row.name, row.kind, f"{row.bypass_channels}/{row.channels}",
            f"{human(b.flops)} -> {human(a.flops)}", pct(b.flops, a.flops), pct(b.params, a.params),
            pct(b.memory_bytes, a.memory_bytes), pct(b.cio_bytes, a.cio_bytes), pct(b.peak_bytes, a.peak_bytes),
            f"{human(b.max_layer_flops)} -> {human(a.max_layer_flops)}",
            f"{b.layer_balance:.2f} -> {a.layer_balance:.2f}",
        ])
    headers = ["stage", "kind", "bypass/ch", "flops", "change", "params", "traffic", "CIO", "peak act.",
               "largest layer", "max/mean"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def split(before: Measurement, after: Measurement, part) -> dict[str, tuple]:
    """Per part: (figures before, figures after, (largest layer, flops) before, after)."""
    groups_before, groups_after = nodes_by_part(before, part), nodes_by_part(after, part)
    return {
        label: (before.stage(groups_before[label]), after.stage(groups_after.get(label, [])),
                largest_layer(before, part, label), largest_layer(after, part, label))
        for label in groups_before
    }


def parts_table(parts: dict[str, tuple]) -> str:
    rows = []
    for label, (b, a, (bname, bflops), (aname, aflops)) in parts.items():
        rows.append([
            label, f"{human(b.flops)} -> {human(a.flops)}", pct(b.flops, a.flops),
            f"{human(b.memory_bytes, 'B')} -> {human(a.memory_bytes, 'B')}", pct(b.memory_bytes, a.memory_bytes),
            pct(b.cio_bytes, a.cio_bytes), f"{human(b.peak_bytes, 'B')} -> {human(a.peak_bytes, 'B')}",
            f"`{bname}` {human(bflops)}" if bname else "-",
            (f"`{aname}` {human(aflops)}" if aname != bname else human(aflops)) if aname else "-",
            pct(bflops, aflops) if bflops else "-",
        ])
    headers = ["part", "flops", "change", "memory traffic", "change", "CIO", "peak act. while it runs",
               "largest layer before", "after", "change"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


# ------------------------------------------------------------------ the run


def run(size: int) -> tuple[list[str], dict, dict]:
    """The per-model subsections, and what the summary needs: (title, scope) -> cspify's
    message where it converts nothing, else (report, parts); and (title, scope) -> what
    tracing kept whole where nothing was converted."""
    out, facts, kept = [], {}, {}
    for title, builder, scopes, options in MODELS:
        print(f"{title} ...", file=sys.stderr, flush=True)
        model, x, whole_part = builder(size)
        out += [f"### {title}", ""]
        for scope, part in scopes:
            part = part or whole_part
            what = f"`scope={scope!r}`" if scope else "Converted whole"
            start = time.perf_counter()
            try:
                csp = cspify.convert(model, x, gamma=GAMMA, scope=scope, **options)
            except CspifyError as error:
                out += [f"{what}: **not converted**. cspify says: \"{error.message}\" (hint: {error.hint})", ""]
                facts[(title, scope)] = error.message
                kept[(title, scope)] = kept_whole(model, x, scope)
                print(f"  {scope}: not converted", file=sys.stderr, flush=True)
                continue
            report = cspify.compare(model, csp, x, scope=scope)
            parts = split(*measured(model, csp, x, scope), part)
            seconds = time.perf_counter() - start
            print(f"  {scope or 'whole'}: {seconds:.0f} s", file=sys.stderr, flush=True)
            converted = sum(r.converted for r in report.stages)
            whole = ", ".join(f"`{m}`" for m in report.kept_whole)
            out += [
                f"{what}, 1x3x{size}x{size}: {converted} of {len(report.stages)} stages found converted"
                + (f"; kept whole by tracing: {whole}" if whole else "") + f" (convert and measure: {seconds:.0f} s).",
                "",
                totals_table(report),
                "",
                stages_table(report),
                "",
                "By part of the measured module (module paths; peak: the most activation bytes alive while the "
                "part's ops run):",
                "",
                parts_table(parts),
                "",
            ]
            facts[(title, scope)] = (report, parts)
    return out, facts, kept


# ------------------------------------------------------------------ the summary


def find(parts: dict, *words: str) -> tuple[str | None, tuple | None]:
    """The first part whose label holds one of ``words``: (label, its figures)."""
    return next(((label, value) for label, value in parts.items() if any(w in label for w in words)), (None, None))


def where_largest(parts: dict, flops: int) -> tuple[str, str]:
    """(layer, part) of the measured module's largest layer."""
    return next(((name, label) for label, (_, _, (name, f), _) in parts.items() if name and f == flops), ("?", "?"))


def layer_cut(row) -> float:
    return row.after.max_layer_flops / row.before.max_layer_flops if row.before.max_layer_flops else 1.0


def summary(facts: dict, kept: dict) -> list[str]:
    """The paper's statements beside the measured figures, and what they say, from ``facts``."""
    converted = {key: fact for key, fact in facts.items() if isinstance(fact, tuple)}
    bottleneck, pyramid, prose = [], [], []
    stage_rows = [(title, row) for (title, _), (report, _) in converted.items()
                  for row in report.stages if row.converted]
    for (title, scope), (report, parts) in converted.items():
        short = title.split(" (")[0] + (f" {scope}" if scope else "")
        o, c = report.original, report.converted
        name, label = where_largest(parts, o.max_layer_flops)
        qualified = f"{scope}.{name}" if scope and name != "?" else name
        bottleneck.append([f"{short}: largest layer", pct(o.max_layer_flops, c.max_layer_flops), f"`{qualified}`, {label}"])
        bottleneck.append([f"{short}: layer max/mean", pct(o.layer_balance, c.layer_balance), ""])
        rows = [row for row in report.stages if row.converted]
        if rows:
            cuts = [pct(r.before.max_layer_flops, r.after.max_layer_flops)
                    for r in sorted(rows, key=lambda r: (layer_cut(r), r.name))]
            bottleneck.append([f"{short}: largest layer of each converted stage",
                               cuts[0] if cuts[0] == cuts[-1] else f"{cuts[0]} to {cuts[-1]}", ""])
        plabel, pfig = find(parts, "neck", "FPN")
        if plabel:
            b, a = pfig[0], pfig[1]
            pyramid.append([f"{short}: {plabel.split(' (')[0]} memory traffic / CIO / peak",
                            f"{pct(b.memory_bytes, a.memory_bytes)} / {pct(b.cio_bytes, a.cio_bytes)} / "
                            f"{pct(b.peak_bytes, a.peak_bytes)}", ""])
        pyramid.append([f"{short}: whole measured module, memory traffic", pct(o.memory_bytes, c.memory_bytes), ""])
    rows = [[PAPER_BOTTLENECK, "-80%", *bottleneck[0]], *[["", "", *r] for r in bottleneck[1:]],
            [PAPER_PYRAMID, "-75%", *pyramid[0]], *[["", "", *r] for r in pyramid[1:]]] if bottleneck else []
    table = tabulate(rows, headers=["paper's statement", "paper", "measured here", "change", "largest layer"],
                     tablefmt="github", disable_numparse=True)

    if stage_rows:
        best_title, best = min(stage_rows, key=lambda item: layer_cut(item[1]))
        untouched = [(title.split(" (")[0], *where_largest(parts, report.original.max_layer_flops),
                      pct(report.original.max_layer_flops, report.converted.max_layer_flops))
                     for (title, _), (report, parts) in converted.items()]
        moved = [u for u in untouched if u[3] != "+0.0%"]
        prose.append(
            "**Computational bottleneck.** Inside the stages it converts, cspify cuts the largest layer by as much as "
            f"{pct(best.before.max_layer_flops, best.after.max_layer_flops)} (`{best.name}`, "
            f"{best_title.split(' (')[0]}). But the largest layer of each detector measured here lies outside those "
            "stages: " + "; ".join(f"{m}: `{n}` in the {p} ({c})" for m, n, p, c in untouched) + ". "
            + ("None of them moves, and as the other layers shrink the spread (largest over mean) grows. So "
               "cspify's mechanical conversion reaches the paper's -80% for no model-wide bottleneck here, and comes "
               "near it only layer by layer inside a converted stage. " if not moved else "")
            + "The paper reports its figure from its detection experiments, where the CSP backbone comes with its "
            "EFM neck. cspify converts a neck's conv stacks (YOLOv3's five-conv sets) as plain stages, CSP over "
            "them as in Scaled-YOLOv4's CSP-PAN, and the conv towers of a head that tracing keeps whole on "
            "their own (cspify.parts). Where the first conv of a five-conv set narrows the pyramid's concat (the "
            "largest layer of YOLOv3's neck), the stage starts at the concat, so that conv runs on the through "
            "part too; with `pyramid='maxout'` the Maxout compresses each part of that split, before the conv and "
            "before the transition that reads the bypass. An FPN's single conv per level stays as it is."
        )
        necks = [(title.split(" (")[0], *find(parts, "neck", "FPN")) for (title, _), (_, parts) in converted.items()]
        necks = [(m, label.split(" (")[0], fig) for m, label, fig in necks if label]
        backbones = [(title.split(" (")[0], *find(parts, "backbone", "body"))
                     for (title, _), (_, parts) in converted.items()]
        prose.append(
            "**Memory of the feature pyramid.** A converted stage keeps its output shapes, so the maps the pyramid "
            "hands between levels stay as they are; what falls is the traffic inside the stages converted. In the "
            "neck: "
            + "; ".join(f"{m} {label}: memory traffic {pct(f[0].memory_bytes, f[1].memory_bytes)}, CIO "
                        f"{pct(f[0].cio_bytes, f[1].cio_bytes)}" for m, label, f in necks)
            + ". In the backbone: "
            + "; ".join(f"{m} {label.split(' (')[0]}: {pct(f[0].memory_bytes, f[1].memory_bytes)}"
                        for m, label, f in backbones if label)
            + ". The paper's -75% is EFM's doing: it compresses the pyramid's feature maps (cross-channel pooling, "
            "Maxout) and fuses, for each output scale, the levels that fit its anchors; `pyramid='maxout'` "
            "compresses what convs read of each concat of pyramid levels (Maxout over pairs of channels): the "
            "concat a lone conv reads, or each part of the CSP split of a concat a stage starts at, which halves "
            "those convs' inputs again (the CIO rows above). Each Maxout is one more read of what it compresses, "
            "so it saves less memory traffic than CIO."
        )
    refused = [(title, scope, fact) for (title, scope), fact in facts.items() if isinstance(fact, str)]
    towers = [(title, scope, report) for (title, scope), (report, _) in converted.items()
              if scope and scope.startswith("head.")]
    if refused or towers:
        prose.append(
            "**Refusals and heads.** " + " ".join(
                f"{title.split(' (')[0]}{f' with `scope={scope!r}`' if scope else ', converted whole,'} is not "
                f"converted: cspify says \"{message.rstrip('.')}\""
                + (f" (tracing keeps {whole} whole)"
                   if (whole := kept.get((title, scope))) and "kept whole" not in message else "") + "."
                for title, scope, message in refused)
            + "".join(
                f" A module the head calls at every level converts on its own: with `scope={scope!r}` its one "
                f"conversion runs at every level, flops {pct(r.original.flops, r.converted.flops)} and memory "
                f"traffic {pct(r.original.memory_bytes, r.converted.memory_bytes)} (measured on the first level's "
                "input)." for _, scope, r in towers)
        )
    return [table, "", *(p + "\n" for p in prose)]


def wider_gamma(size: int, gamma: float = 0.75) -> list[str]:
    """YOLOv3 converted whole at a second gamma: the totals the bottleneck goal reads."""
    print(f"YOLOv3 at gamma {gamma} ...", file=sys.stderr, flush=True)
    model, x, _ = yolov3(size)
    report = cspify.compare(model, cspify.convert(model, x, gamma=gamma), x)
    o, c = report.original, report.converted
    return [f"At gamma {gamma}, YOLOv3 converted whole: largest layer {pct(o.max_layer_flops, c.max_layer_flops)} "
            f"({human(o.max_layer_flops)} -> {human(c.max_layer_flops)}), flops {pct(o.flops, c.flops)}, memory traffic "
            f"{pct(o.memory_bytes, c.memory_bytes)}, CIO {pct(o.cio_bytes, c.cio_bytes)}.", ""]


def section(size: int) -> str:
    start = time.perf_counter()
    subsections, facts, kept = run(size)
    wider = wider_gamma(size)
    seconds = time.perf_counter() - start
    import ultralytics

    command = " ".join(["python", "benchmarks/detectors.py", *sys.argv[1:]])
    lines = [
        BEGIN,
        "## Detectors",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} in {seconds:.0f} s: torch "
        f"{torch.__version__}, torchvision {torchvision.__version__}, ultralytics {ultralytics.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores. Re-run that command to regenerate "
        "this section (it replaces only this section).",
        "",
        f"gamma {GAMMA}, every other option at its default; random weights; fvcore flops (one multiply-add = one "
        "flop); memory traffic = bytes each op reads and writes; CIO = conv input plus output feature maps; peak = "
        "activation bytes alive at once (tensor lifetimes in the traced graph); largest layer = the conv or linear "
        "with the most flops (the paper's \"computational bottleneck\"), max/mean = largest over the mean of the "
        "layers. Torchvision detectors are measured at the scope that was converted (`cspify.compare(..., scope=)`), "
        "fed what it receives inside the whole model; changes are after over before (negative: smaller).",
        "",
        f"Models, random weights: ultralytics' `yolov3.yaml` (Darknet-53 backbone and YOLOv3's neck, with "
        f"ultralytics' decoupled Detect head) at 1x3x{size}x{size}, converted whole (with the defaults, with "
        f"`pyramid='maxout'`, and at gamma 0.75), and `yolov8n.yaml` as it comes; torchvision's "
        f"`fasterrcnn_resnet50_fpn` and `retinanet_resnet50_fpn` (`weights=None, weights_backbone=None, "
        f"min_size=max_size={size}`) on one 3x{size}x{size} image, converted with `scope=`.",
        "",
        "The CSPNet paper's detection statements (quoted as issue 13 gives them; `shared/CSPNET.md` lists no "
        "detection figures) next to what cspify's mechanical conversion measures:",
        "",
        *summary(facts, kept),
        *wider,
        *subsections,
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="input side S: 1x3xSxS [320]")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="file whose section to write; - prints it")
    args = parser.parse_args()
    text = section(args.size)
    if args.out == "-":
        print(text, end="")
    else:
        write_section(args.out, text, BEGIN, END, heading="## Detectors")
        print(f"wrote the Detectors section of {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
