"""A converted YOLO trained inside ultralytics, end to end and offline: a small YOLO-format
dataset written here (cspify.integrations.yolo_data), ``YOLO(path).train`` with cspify's
Trainer, the checkpoint it saves loaded back still converted, then ``val`` and ``predict``.
ultralytics' own trainer, left to itself, would rebuild the original from the YAML: that is
refused in one sentence instead. (Environment settings as in test_ultralytics.py.)"""

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
from cspify.errors import ConfigError, LoadError, OutputError  # noqa: E402
from cspify.integrations.yolo_data import write_pasted  # noqa: E402
from cspify.load import import_ultralytics  # noqa: E402
from cspify.record import find_conversions  # noqa: E402

try:
    ultralytics = import_ultralytics()
except LoadError:
    pytest.skip("ultralytics is not installed (pip install -e '.[dev]')", allow_module_level=True)
from ultralytics.nn.tasks import DetectionModel, yaml_model_load  # noqa: E402

from cspify.integrations import ultralytics as csp_yolo  # noqa: E402

SIZE = 160
X = torch.randn(1, 3, SIZE, SIZE)
NAMES = ["square", "bar", "ring"]


def small_yolov3(nc: int = 3) -> DetectionModel:
    """YOLOv3's layout (Darknet backbone, five-conv neck, Detect head) at an eighth of its widths."""
    cfg = yaml_model_load("yolov3.yaml")
    cfg.update(depth_multiple=0.33, width_multiple=0.125, nc=nc)
    torch.manual_seed(0)
    return DetectionModel(cfg, verbose=False).eval()


def shapes(n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Three kinds of bright 20x20 shapes, one label each."""
    items = np.zeros((n, 20, 20), dtype=np.uint8)
    yy, xx = np.mgrid[:20, :20]
    for i in range(n):
        kind = i % 3
        mask = ([np.ones((20, 20), bool), np.abs(yy - 10) < 4, np.abs(np.hypot(yy - 10, xx - 10) - 7) < 2])[kind]
        items[i][mask] = 160 + 3 * i
    return items, np.arange(n) % 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    items, labels = shapes()
    return write_pasted(tmp_path_factory.mktemp("data") / "shapes", items, labels, NAMES, train=8, val=4, size=SIZE)


@pytest.fixture(scope="module")
def converted():
    model = small_yolov3()
    return model, cspify.convert(model, X)


@pytest.fixture(scope="module")
def checkpoint(converted, tmp_path_factory):
    return csp_yolo.save(converted[1], tmp_path_factory.mktemp("ckpt") / "csp.pt")


def train_args(tmp_path, name: str) -> dict:
    return dict(epochs=1, imgsz=SIZE, device="cpu", batch=4, workers=0, plots=False, project=str(tmp_path),
                name=name, exist_ok=True)


def stage_names(model) -> list[list[str]]:
    return [[s.name for s in record.converted] for _, record in find_conversions(model)]


def test_the_written_dataset_has_a_box_per_pasted_item_inside_its_canvas(dataset):
    root = dataset.parent
    assert "names:\n  0: square\n  1: bar\n  2: ring\n" in dataset.read_text()
    images = sorted((root / "images" / "train").iterdir())
    assert len(images) == 8 and len(list((root / "images" / "val").iterdir())) == 4
    for label in (root / "labels" / "train").iterdir():
        rows = np.loadtxt(label, ndmin=2)
        assert 1 <= len(rows) <= 3 and set(rows[:, 0]) <= {0, 1, 2}
        x, y, w, h = rows[:, 1:].T
        assert ((x - w / 2) >= 0).all() and ((x + w / 2) <= 1 + 1e-6).all() and ((y + h / 2) <= 1 + 1e-6).all()


def test_writing_a_dataset_refuses_bad_items_and_leaves_nothing(tmp_path):
    items, labels = shapes()
    with pytest.raises(ConfigError, match="labels go up to 2 but 2 names are given"):
        write_pasted(tmp_path / "a", items, labels, NAMES[:2])
    with pytest.raises(ConfigError, match="larger than the 40-pixel canvas"):
        write_pasted(tmp_path / "b", items, labels, NAMES, size=40)
    (tmp_path / "c").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        write_pasted(tmp_path / "c", items, labels, NAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_the_saved_conversion_loads_with_yolo_as_the_converted_architecture(converted, checkpoint):
    model, csp = converted
    yolo = ultralytics.YOLO(str(checkpoint))
    assert isinstance(yolo.model, csp_yolo.ConvertedDetectionModel) and yolo.task == "detect"
    assert stage_names(yolo.model) == stage_names(csp)
    assert yolo.model.names == model.names and yolo.model.model[-1] is yolo.model.graph.get_submodule("model.28")
    with torch.no_grad():
        assert torch.allclose(yolo.model.eval()(X)[0], csp(X)[0], atol=1e-5)  # the same model, saved and loaded
    again = pickle.loads(pickle.dumps(copy.deepcopy(yolo.model)))
    assert stage_names(again) == stage_names(csp)


def test_ultralytics_own_trainer_is_refused_rather_than_losing_the_conversion(checkpoint, dataset, tmp_path):
    """Without cspify's Trainer, ultralytics rebuilds the model from its YAML and copies in the
    weights that still fit: the original architecture, trained as if it were the conversion."""
    yolo = ultralytics.YOLO(str(checkpoint))
    with pytest.raises(ConfigError, match="would rebuild the original architecture from its YAML") as info:
        yolo.train(data=str(dataset), **train_args(tmp_path, "default"))
    assert "trainer=cspify.integrations.ultralytics.Trainer" in info.value.hint
    assert not (tmp_path / "default" / "weights" / "last.pt").exists()


def test_the_converted_yolo_trains_saves_reloads_validates_and_predicts(converted, checkpoint, dataset, tmp_path):
    _, csp = converted
    yolo = ultralytics.YOLO(str(checkpoint))
    before = {k: v.clone() for k, v in yolo.model.state_dict().items()}
    yolo.train(data=str(dataset), trainer=csp_yolo.Trainer, **train_args(tmp_path, "csp"))
    last = tmp_path / "csp" / "weights" / "last.pt"
    trained = ultralytics.YOLO(str(last))
    assert isinstance(trained.model, csp_yolo.ConvertedDetectionModel)
    assert stage_names(trained.model) == stage_names(csp)
    after = trained.model.state_dict()
    assert before.keys() == after.keys()
    moved = [k for k, v in before.items() if v.is_floating_point() and not torch.allclose(v, after[k].float())]
    assert any(".through." in k or "transition" in k for k in moved), "the converted stages' layers were trained"
    metrics = trained.val(data=str(dataset), imgsz=SIZE, device="cpu", batch=4, workers=0, plots=False,
                          project=str(tmp_path), name="val")
    assert 0.0 <= metrics.box.map50 <= 1.0
    image = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    (result,) = trained.predict(image, imgsz=SIZE, device="cpu", verbose=False, save=False)
    assert result.boxes.data.shape[1] == 6 and result.names == dict(enumerate(NAMES))


def test_the_trainer_refuses_a_model_that_is_not_converted_or_has_other_classes(dataset, tmp_path):
    plain = tmp_path / "plain.pt"
    yolo = ultralytics.YOLO("yolov3.yaml", verbose=False)
    yolo.model = small_yolov3()
    yolo.save(str(plain))
    with pytest.raises(ConfigError, match="trains a converted model, and this one is not converted"):
        ultralytics.YOLO(str(plain)).train(data=str(dataset), trainer=csp_yolo.Trainer, **train_args(tmp_path, "p"))
    other = csp_yolo.save(cspify.convert(small_yolov3(nc=5), X), tmp_path / "five.pt")
    with pytest.raises(ConfigError, match="detects 5 classes and the dataset has 3"):
        ultralytics.YOLO(str(other)).train(data=str(dataset), trainer=csp_yolo.Trainer, **train_args(tmp_path, "f"))


def test_saving_refuses_a_model_cspify_did_not_convert(tmp_path):
    with pytest.raises(ConfigError, match="not converted by cspify"):
        csp_yolo.save(small_yolov3(), tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_scope_conversion_saves_and_loads_as_ultralytics_own_layers(tmp_path):
    model = small_yolov3()
    csp = cspify.convert(model, X, scope="model.8")
    path = csp_yolo.save(csp, tmp_path / "scoped.pt")
    loaded = ultralytics.YOLO(str(path)).model
    assert isinstance(loaded, csp_yolo.ScopedDetectionModel) and stage_names(loaded) == stage_names(csp)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(X)[0], csp(X)[0], atol=1e-5)


MODEL_FILE = """
from ultralytics.nn.tasks import DetectionModel, yaml_model_load
import torch

cfg = yaml_model_load("yolov3.yaml")
cfg.update(depth_multiple=0.33, width_multiple=0.125, nc=3)
torch.manual_seed(0)
model = DetectionModel(cfg, verbose=False)
"""


def _cli(*args):
    from click.testing import CliRunner

    from cspify.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_command_line_saves_a_checkpoint_yolo_loads_converted(tmp_path):
    (tmp_path / "yolo_model.py").write_text(MODEL_FILE)
    path = tmp_path / "csp.pt"
    result = _cli("convert", tmp_path / "yolo_model.py", "--input-shape", f"1,3,{SIZE},{SIZE}", "--yolo", path, "-q")
    assert result.exit_code == 0, result.output
    assert f"saved the ultralytics checkpoint (train it with trainer=cspify.integrations.ultralytics.Trainer) " \
           f"to {path}" in result.output
    loaded = ultralytics.YOLO(str(path)).model
    assert isinstance(loaded, csp_yolo.ConvertedDetectionModel)
    assert stage_names(loaded) == stage_names(cspify.convert(small_yolov3(), X))


def test_the_command_line_refuses_a_checkpoint_of_a_model_that_is_not_a_yolo(tmp_path):
    examples = os.path.join(os.path.dirname(__file__), "..", "examples", "resnet_like.py")
    result = _cli("convert", examples, "--input-shape", "1,3,32,32", "--yolo", tmp_path / "r.pt", "-o", tmp_path / "r2.pt")
    assert result.exit_code != 0
    assert "is not a converted ultralytics detection model" in result.output
    assert list(tmp_path.iterdir()) == []
    result = _cli("convert", examples, "--yolo", tmp_path / "r.pt", "--inference")
    assert result.exit_code != 0 and "drop one of --yolo and --inference" in result.output
