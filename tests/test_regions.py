"""A detector's report per part (cspify.regions): backbone, neck and head, each with its
memory traffic, CIO, activation peak and largest layer, on ultralytics' and torchvision's
layouts; a model of no known layout has no such table."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "0")
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "cspify-tests-ultralytics"))

import cspify  # noqa: E402
from cspify.errors import LoadError  # noqa: E402
from cspify.load import import_ultralytics  # noqa: E402
from cspify.measure import measure  # noqa: E402
from cspify.regions import nodes_by_part, part_of  # noqa: E402
from tiny_models import TinyResNet  # noqa: E402

X = torch.randn(1, 3, 128, 128)


def small_yolov3():
    try:
        import_ultralytics()
    except LoadError:
        pytest.skip("ultralytics is not installed")
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    cfg = yaml_model_load("yolov3.yaml")
    cfg.update(depth_multiple=0.33, width_multiple=0.125, nc=3)
    torch.manual_seed(0)
    return DetectionModel(cfg, verbose=False).eval()


def test_a_yolo_report_has_its_backbone_neck_and_head():
    model = small_yolov3()
    csp = cspify.convert(model, X)
    report = cspify.compare(model, csp, X)
    assert [r.name for r in report.regions] == ["backbone", "neck", "head"]
    neck = report.regions[1]
    assert neck.after.memory_bytes < neck.before.memory_bytes and neck.after.flops < neck.before.flops
    assert neck.largest_before[0].startswith("model.1") and neck.largest_before[1] > 0
    assert sum(r.before.flops for r in report.regions) == report.original.flops  # every layer in one part
    assert sum(r.after.flops for r in report.regions) == report.converted.flops
    text = str(report)
    assert "per part:" in text and "\n  neck " in text
    assert report.to_dict()["regions"][2]["name"] == "head" and "### Per part" in report.to_markdown()


def test_the_parts_follow_the_yaml_and_skip_paths_they_do_not_place():
    part = part_of(small_yolov3())
    assert [part(p) for p in ("model.0.conv", "model.10.0.cv1", "model.11.cv1.conv", "model.28.cv3.0.0", "stem")] \
        == ["backbone", "backbone", "neck", "head", None]


def test_a_torchvision_detector_measured_at_its_backbone_has_body_and_fpn():
    torchvision = pytest.importorskip("torchvision")
    det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=128).eval()
    part = part_of(det, "backbone")
    assert (part("body.0.0"), part("fpn.inner_blocks.0"), part_of(det)("rpn.head.conv")) == ("backbone", "neck", "head")
    m = measure(*cspify.trace.capture_inputs(det, (X,), "backbone"))
    groups = nodes_by_part(m, part)
    assert list(groups) == ["backbone", "neck"] and sum(map(len, groups.values())) == len(m.nodes)


def test_a_model_of_no_known_layout_has_no_parts():
    model = TinyResNet().eval()
    x = torch.randn(1, 3, 32, 32)
    report = cspify.compare(model, cspify.convert(model, x), x)
    assert report.regions == [] and "per part:" not in str(report)
