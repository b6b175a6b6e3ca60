"""Ultralytics YOLO as it comes: built from the YAMLs the package ships, offline, converted
without wrappers, and still working inside its framework (predict, training loss and
gradients, deepcopy and pickling, ONNX).

ultralytics reads its environment when imported; these keep it off the network and quiet:
YOLO_OFFLINE=1 skips its online checks (nothing is downloaded), YOLO_AUTOINSTALL=0 keeps it
from pip-installing what it misses (an export's tools, an image plugin), YOLO_VERBOSE=0
quiets its logs, and YOLO_CONFIG_DIR puts the settings.json it writes in the temporary
folder. It is imported as cspify imports it (``cspify.load.import_ultralytics``), which puts
back the functions its import patches for the whole process (PIL's Image.open, torch.save),
so that the other tests see the libraries as they are.
"""

import copy
import os
import pickle
import tempfile

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_VERBOSE", "0")
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "cspify-tests-ultralytics"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cspify  # noqa: E402
from cspify.errors import LoadError, NoStageError  # noqa: E402
from cspify.load import import_ultralytics, load_model  # noqa: E402
from cspify.record import conversion_of  # noqa: E402
from cspify.trace import trace  # noqa: E402
from cspify.verify import drop_in_problems  # noqa: E402

try:
    ultralytics = import_ultralytics()
except LoadError:
    pytest.skip("ultralytics is not installed (pip install -e '.[dev]')", allow_module_level=True)
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

X = torch.randn(1, 3, 64, 64)


def build(name: str) -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel(name, verbose=False).eval()


@pytest.fixture(scope="module")
def yolov8n():
    model = build("yolov8n.yaml")
    return model, nested(model)


def nested(model):
    """Its C2f/C3 blocks are CSP already: cspify leaves them unless each stage is named."""
    return cspify.convert(model, X, stages=[s.name for s in cspify.find_stages(model, X)])


@pytest.mark.parametrize("name", ["yolov8n.yaml", "yolov5nu.yaml"])
def test_yolo_blocks_are_recognised_as_cross_stage_partial_already(name):
    with pytest.raises(NoStageError, match="already the through part of a cross stage partial block") as info:
        cspify.convert(build(name), X)
    assert "--stage" in info.value.hint


@pytest.mark.parametrize("name", ["yolov8n.yaml", "yolov5nu.yaml"])
def test_yolo_converts_as_it_comes(name, yolov8n):
    model, csp = yolov8n if name == "yolov8n.yaml" else (build(name), None)
    csp = csp or nested(model)
    record = conversion_of(csp)
    residual = [s for s in record.converted if s.kind == "residual"]  # the backbone's bottleneck chains
    assert len(residual) == (6 if name == "yolov8n.yaml" else 4)
    assert drop_in_problems(model, copy.deepcopy(csp), X) == []
    report = cspify.compare(model, csp, X)
    assert report.converted.flops < report.original.flops


def test_the_detect_head_is_kept_whole_with_its_cause():
    model = build("yolov8n.yaml")
    head = f"model.{len(model.model) - 1}"
    kept = trace(model, X).kept_whole
    assert list(kept) == [head]
    assert "control flow" in kept[head]


def test_the_record_lists_the_head_kept_whole(yolov8n):
    model, csp = yolov8n
    assert f"model.{len(model.model) - 1}" in conversion_of(csp).leaf_modules


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the head's shape check, traced by the exporter
def test_converted_yolo_trains_copies_and_exports(yolov8n, tmp_path):
    model, csp = yolov8n
    csp = copy.deepcopy(csp)
    with torch.no_grad():
        expected = csp(X)[0]
    csp.train()
    out = csp(X)  # the head's training output: boxes, scores and features
    assert set(out) == {"boxes", "scores", "feats"}
    sum(t.float().sum() for t in torch.utils._pytree.tree_leaves(out)).backward()
    trainable = [p for p in csp.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    csp.eval()
    again = pickle.loads(pickle.dumps(copy.deepcopy(csp)))
    with torch.no_grad():
        assert torch.allclose(again(X)[0], csp(X)[0])
    onnxruntime = pytest.importorskip("onnxruntime")
    path = tmp_path / "yolo.onnx"
    torch.onnx.export(csp, (X,), str(path), dynamo=False)
    session = onnxruntime.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
    assert expected.shape == got.shape
    with torch.no_grad():
        assert np.allclose(csp(X)[0].numpy(), got, atol=1e-4)


def test_a_block_converted_in_place_keeps_working_in_the_yolo_wrapper():
    torch.manual_seed(0)
    yolo = ultralytics.YOLO("yolov8n.yaml", verbose=False)
    yolo.model = cspify.convert(yolo.model.eval(), X, scope="model.6", stages=["m.0", "m.1"])  # a C2f: nested
    assert conversion_of(yolo.model, "model.6").converted
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    (result,) = yolo.predict(image, imgsz=64, device="cpu", verbose=False, save=False)
    assert result.boxes.data.shape[1] == 6
    trainer_copy = copy.deepcopy(yolo.model).train()  # ultralytics' EMA deep-copies the model
    trainer_copy.args = ultralytics.cfg.get_cfg()
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[1.0], [2.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])}
    loss, _ = trainer_copy(batch)
    loss.sum().backward()
    assert trainer_copy.model[6].cv1.conv.weight.grad is not None
    restored = pickle.loads(pickle.dumps(trainer_copy))
    assert (restored.model[6].f, restored.model[6].i) == (-1, 6)


def test_a_whole_converted_yolo_takes_the_models_place_in_the_yolo_wrapper(yolov8n):
    """The GraphModule keeps the attributes the wrapper reads on its model (names, stride,
    yaml, args), so ``YOLO.predict`` runs it."""
    model, csp = yolov8n
    yolo = ultralytics.YOLO("yolov8n.yaml", verbose=False)
    yolo.model = copy.deepcopy(csp)
    assert (yolo.model.names, yolo.model.stride.tolist()) == (model.names, model.stride.tolist())
    assert yolo.model.names is not model.names  # copies: the user's model is not shared
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    (result,) = yolo.predict(image, imgsz=64, device="cpu", verbose=False, save=False)
    assert result.boxes.data.shape[1] == 6 and result.names == model.names


def test_the_spec_builds_a_yaml_the_package_ships_offline():
    loaded = load_model("ultralytics:yolov8n.yaml", (1, 3, 64, 64))
    assert type(loaded.model) is DetectionModel and not loaded.model.training
    assert loaded.model.yaml["nc"] == 80 and loaded.example_inputs[0].shape == (1, 3, 64, 64)


@pytest.mark.parametrize("spec, words", [
    ("ultralytics:yolov8z-nothing.yaml", "ultralytics has no model YAML named 'yolov8z-nothing.yaml'"),
    ("ultralytics:yolov8n.pt", "ultralytics:yolov8n.pt is not a model YAML"),
    ("ultralytics:yolov8n", "ultralytics:yolov8n is not a model YAML"),
])
def test_the_spec_refuses_what_it_cannot_build_offline(spec, words):
    with pytest.raises(LoadError) as error:
        load_model(spec)
    assert error.value.message.startswith(words) and error.value.hint


def test_the_spec_without_ultralytics_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ultralytics", None)
    with pytest.raises(LoadError, match="ultralytics is not installed") as error:
        load_model("ultralytics:yolov8n.yaml")
    assert "cspify[zoo]" in error.value.hint


def test_importing_ultralytics_leaves_pil_and_torch_as_they_were():
    from PIL import Image

    assert Image.open.__module__ == "PIL.Image" and torch.save.__module__ == "torch.serialization"


def test_yolov3_converts_its_neck_and_head_and_distils_without_labels_or_logits():
    """YOLOv3's five-conv sets are plain stages (the neck), and the conv towers of the Detect
    head, which tracing keeps whole, convert on their own (cspify.parts); a detector has no
    classifier logits, so fine-tuning on images alone distils every converted stage's output
    and nothing else, and the outputs keep their shapes."""
    model = build("yolov3.yaml")
    csp = cspify.convert(model, X)
    record = conversion_of(csp)
    kinds = {s.name: s.kind for s in record.converted}
    assert [n for n, k in kinds.items() if k == "residual"] == ["model.2", "model.4", "model.6", "model.8", "model.10"]
    assert [n for n, k in kinds.items() if k == "plain"] == ["model.11-13", "model.19-21", "model.26-27"]
    assert record.parts == ("model.28.cv2.0", "model.28.cv2.1", "model.28.cv2.2", "model.28.cv3.0")
    with torch.no_grad():
        shapes = [t.shape for t in torch.utils._pytree.tree_leaves(model(X))]
    tuned = cspify.finetune(csp, torch.rand(8, 3, 64, 64), teacher=model, batch_size=4, max_steps=1, progress=False)
    (epoch,) = tuned.meta["cspify.finetune"].epochs
    assert epoch.ce is None and epoch.kd is None and epoch.feature is not None and np.isfinite(epoch.feature)
    assert tuned.meta["cspify.finetune"].settings["stages"] == list(kinds) + [f"{p}:stage1" for p in record.parts]
    with torch.no_grad():
        assert [t.shape for t in torch.utils._pytree.tree_leaves(tuned.eval()(X))] == shapes
