"""cspify.load: from a MODEL spec (file, file:Name, torchvision:NAME, timm:NAME) to a module and inputs."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cspify.errors import ConfigError, CspifyError, LoadError
from cspify.load import DEFAULT_SHAPE, load_model, parse_shape

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def model_file(folder: Path, source: str, name: str = "model.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


HEADER = """\
import torch
import torch.nn as nn
"""

# A block that needs arguments, used inside the one model: like examples/resnet_like.py.
BLOCK_AND_NET = HEADER + textwrap.dedent("""
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(Block(8), Block(8))

    def forward(self, x):
        return self.body(self.stem(x))
""")


def assert_error(excinfo, kind, *words):
    error = excinfo.value
    assert type(error) is kind
    assert isinstance(error, CspifyError)
    assert error.message.strip(), "the error has no message"
    assert error.hint.strip(), "the error has no hint"
    for word in words:
        assert word in error.message, f"{word!r} not in {error.message!r}"
    return error


# ---------------------------------------------------------------- picking the model of a file


def test_the_file_single_model_is_picked_beside_a_block_class_it_uses(tmp_path):
    loaded = load_model(str(model_file(tmp_path, BLOCK_AND_NET)))
    assert type(loaded.model).__name__ == "Net"
    assert not loaded.model.training, "the model must come back in eval mode"
    assert [tuple(x.shape) for x in loaded.example_inputs] == [DEFAULT_SHAPE]


def test_a_block_class_that_needs_no_arguments_is_dropped_when_the_model_uses_it(tmp_path):
    source = HEADER + textwrap.dedent("""
    class Block(nn.Module):
        def __init__(self, c=8):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.body = nn.Sequential(Block(), Block())

        def forward(self, x):
            return self.body(self.stem(x))
    """)
    loaded = load_model(str(model_file(tmp_path, source)))
    assert type(loaded.model).__name__ == "Net"


@pytest.mark.parametrize(
    "example, cls, shape",
    [("resnet_like.py", "ResNetLike", (2, 3, 64, 64)), ("densenet_like.py", "DenseNetLike", (2, 3, 32, 32))],
)
def test_the_examples_load_with_their_example_inputs(example, cls, shape):
    loaded = load_model(str(EXAMPLES / example))
    assert type(loaded.model).__name__ == cls
    assert [tuple(x.shape) for x in loaded.example_inputs] == [shape]
    with torch.no_grad():
        assert loaded.model(*loaded.example_inputs).shape == (shape[0], 10)


def test_a_lone_module_instance_is_picked(tmp_path):
    source = HEADER + textwrap.dedent("""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    net.marker = "the instance"
    """)
    loaded = load_model(str(model_file(tmp_path, source)))
    assert getattr(loaded.model, "marker", None) == "the instance"


def test_a_lone_function_annotated_to_return_a_module_is_picked(tmp_path):
    source = HEADER + textwrap.dedent("""
    def build() -> nn.Module:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        model.marker = "built"
        return model
    """)
    loaded = load_model(str(model_file(tmp_path, source)))
    assert getattr(loaded.model, "marker", None) == "built"


def test_a_function_annotated_with_a_module_subclass_under_postponed_annotations_is_picked(tmp_path):
    """``from __future__ import annotations`` makes the annotation the string 'nn.Sequential'."""
    source = "from __future__ import annotations\n" + HEADER + textwrap.dedent("""
    def build() -> nn.Sequential:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        model.marker = "built"
        return model
    """)
    loaded = load_model(str(model_file(tmp_path, source)))
    assert getattr(loaded.model, "marker", None) == "built"


SEVERAL = HEADER + textwrap.dedent("""
class Alpha(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


class Beta(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x):
        return self.conv(x)


def make_gamma(width=5):
    return nn.Conv2d(3, width, 3)


def make_delta() -> nn.Module:
    model = nn.Conv2d(3, 7, 3)
    model.marker = "delta"
    return model


instance = nn.Conv2d(3, 9, 1)
instance.marker = "instance"
""")


def test_name_picks_a_class(tmp_path):
    path = model_file(tmp_path, SEVERAL)
    loaded = load_model(f"{path}:Beta")
    assert type(loaded.model).__name__ == "Beta"
    assert loaded.model.conv.out_channels == 6
    assert not loaded.model.training


def test_name_picks_a_function_returning_a_module(tmp_path):
    path = model_file(tmp_path, SEVERAL)
    assert load_model(f"{path}:make_gamma").model.out_channels == 5  # not annotated: fine when named
    assert load_model(f"{path}:make_delta").model.marker == "delta"


def test_name_picks_a_module_instance(tmp_path):
    path = model_file(tmp_path, SEVERAL)
    loaded = load_model(f"{path}:instance")
    assert getattr(loaded.model, "marker", None) == "instance"
    assert loaded.model.out_channels == 9


# ---------------------------------------------------------------- example inputs


EXAMPLE_INPUTS = BLOCK_AND_NET + """

def example_inputs():
    return torch.randn(2, 3, 20, 20)
"""


def test_example_inputs_of_the_file_are_used_without_a_shape(tmp_path):
    loaded = load_model(str(model_file(tmp_path, EXAMPLE_INPUTS)))
    assert isinstance(loaded.example_inputs, tuple)
    assert [tuple(x.shape) for x in loaded.example_inputs] == [(2, 3, 20, 20)]


def test_example_inputs_are_used_with_a_name_too(tmp_path):
    loaded = load_model(f"{model_file(tmp_path, EXAMPLE_INPUTS)}:Net")
    assert [tuple(x.shape) for x in loaded.example_inputs] == [(2, 3, 20, 20)]


def test_an_explicit_shape_wins_over_example_inputs(tmp_path):
    loaded = load_model(str(model_file(tmp_path, EXAMPLE_INPUTS)), (1, 3, 8, 8))
    assert [tuple(x.shape) for x in loaded.example_inputs] == [(1, 3, 8, 8)]


def test_example_inputs_may_return_several_tensors(tmp_path):
    source = HEADER + textwrap.dedent("""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, a, b):
            return self.conv(a) + b


    def example_inputs():
        return [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)]
    """)
    loaded = load_model(str(model_file(tmp_path, source)))
    assert isinstance(loaded.example_inputs, tuple) and len(loaded.example_inputs) == 2
    assert loaded.model(*loaded.example_inputs).shape == (1, 3, 4, 4)


def test_the_file_folder_is_importable_while_loading_and_sys_path_is_restored(tmp_path):
    (tmp_path / "cspify_test_helper_blocks.py").write_text(
        "import torch.nn as nn\n\nclass Helper(nn.Conv2d):\n    pass\n"
    )
    source = HEADER + textwrap.dedent("""
    from cspify_test_helper_blocks import Helper


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = Helper(3, 4, 3)

        def forward(self, x):
            return self.conv(x)
    """)
    before = list(sys.path)
    try:
        loaded = load_model(str(model_file(tmp_path, source)))
    finally:
        sys.modules.pop("cspify_test_helper_blocks", None)
    assert type(loaded.model).__name__ == "Net"
    assert sys.path == before


# ---------------------------------------------------------------- model zoos


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:resnet18"])
def test_zoo_models_load_with_random_weights(spec):
    first = load_model(spec)
    second = load_model(spec, (1, 3, 32, 32))
    assert isinstance(first.model, nn.Module) and not first.model.training
    assert type(first.model).__name__ == "ResNet"
    assert [tuple(x.shape) for x in first.example_inputs] == [DEFAULT_SHAPE]
    assert [tuple(x.shape) for x in second.example_inputs] == [(1, 3, 32, 32)]
    # random initialisation, not a downloaded checkpoint: two loads differ
    assert not torch.equal(first.model.conv1.weight, second.model.conv1.weight)


@pytest.mark.parametrize("spec", ["torchvision:no_such_net_xyz", "timm:no_such_net_xyz"])
def test_unknown_zoo_names_are_load_errors(spec):
    with pytest.raises(LoadError) as excinfo:
        load_model(spec)
    assert_error(excinfo, LoadError, "no_such_net_xyz")


# ---------------------------------------------------------------- load errors


def test_missing_file(tmp_path):
    with pytest.raises(LoadError) as excinfo:
        load_model(str(tmp_path / "nothere.py"))
    assert_error(excinfo, LoadError, "nothere.py")


def test_missing_file_with_a_name(tmp_path):
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{tmp_path / 'nothere.py'}:Net")
    assert_error(excinfo, LoadError, "nothere.py")


def test_syntax_error_in_the_file_names_the_line(tmp_path):
    path = model_file(tmp_path, HEADER + "\n\nclass Net(nn.Module)\n    pass\n")
    with pytest.raises(LoadError) as excinfo:
        load_model(str(path))
    assert_error(excinfo, LoadError, "syntax", "line 5")


def test_import_error_inside_the_file(tmp_path):
    path = model_file(tmp_path, HEADER + "import cspify_no_such_package_xyz\n")
    with pytest.raises(LoadError) as excinfo:
        load_model(str(path))
    assert_error(excinfo, LoadError, "cspify_no_such_package_xyz")


def test_an_exception_while_running_the_file(tmp_path):
    path = model_file(tmp_path, HEADER + "raise RuntimeError('boom at import')\n")
    with pytest.raises(LoadError) as excinfo:
        load_model(str(path))
    assert_error(excinfo, LoadError, "boom at import")


def test_a_file_with_no_module(tmp_path):
    source = HEADER + textwrap.dedent("""
    WIDTH = 8


    def helper(x):
        return x * 2


    class Block(nn.Module):  # needs an argument: not a candidate
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3)
    """)
    with pytest.raises(LoadError) as excinfo:
        load_model(str(model_file(tmp_path, source)))
    assert_error(excinfo, LoadError, "no model")


def test_several_candidates_are_listed(tmp_path):
    with pytest.raises(LoadError) as excinfo:
        load_model(str(model_file(tmp_path, SEVERAL)))
    error = assert_error(excinfo, LoadError, "several")
    for name in ("Alpha", "Beta", "make_delta", "instance"):
        assert name in error.message
    assert ":" in error.hint  # suggests MODEL:Name


def test_a_named_constructor_that_needs_arguments(tmp_path):
    path = model_file(tmp_path, BLOCK_AND_NET)
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{path}:Block")
    assert_error(excinfo, LoadError, "Block", "argument")


def test_a_name_that_does_not_exist_lists_what_does(tmp_path):
    path = model_file(tmp_path, BLOCK_AND_NET)
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{path}:Missing")
    error = assert_error(excinfo, LoadError, "Missing")
    assert "Net" in error.hint


def test_a_name_that_is_not_a_module(tmp_path):
    path = model_file(tmp_path, BLOCK_AND_NET + "\nWIDTH = 8\n\n\ndef not_a_model():\n    return 3\n")
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{path}:WIDTH")
    assert_error(excinfo, LoadError, "WIDTH")
    with pytest.raises(LoadError) as excinfo:
        load_model(f"{path}:not_a_model")
    assert_error(excinfo, LoadError, "not_a_model")


def test_a_constructor_that_raises(tmp_path):
    source = HEADER + textwrap.dedent("""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            raise ValueError("bad width")
    """)
    with pytest.raises(LoadError) as excinfo:
        load_model(str(model_file(tmp_path, source)))
    assert_error(excinfo, LoadError, "bad width")


def test_load_errors_leave_sys_path_alone(tmp_path):
    before = list(sys.path)
    with pytest.raises(LoadError):
        load_model(str(model_file(tmp_path, HEADER + "import cspify_no_such_package_xyz\n")))
    assert sys.path == before


def test_load_errors_exit_with_3():
    assert LoadError("m", "h").exit_code == 3
    assert ConfigError("m", "h").exit_code == 2


# ---------------------------------------------------------------- parse_shape


@pytest.mark.parametrize(
    "text, shape",
    [("1,3,224,224", (1, 3, 224, 224)), ("2,3,16,16", (2, 3, 16, 16)), ("1x3x8x8", (1, 3, 8, 8)), ("1, 3, 8, 8", (1, 3, 8, 8))],
)
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["abc", "1,3,-2,2", "", "1,3,0,2", "1,3,,2", "1.5,3,8,8", "1,3,8,8,"])
def test_parse_shape_rejects(text):
    with pytest.raises(ConfigError) as excinfo:
        parse_shape(text)
    error = assert_error(excinfo, ConfigError)
    assert repr(text) in error.message


# ---------------------------------------------------------------- two names, one model


NET = HEADER + textwrap.dedent("""
class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)

    def forward(self, x):
        return self.conv(x)
""")


@pytest.mark.parametrize("tail, width", [
    ("model = Net\n", 4),                                              # an alias of the class
    ("net = Net()\nnet.conv.out_channels = 5\nmodel = net\n", 5),     # one instance, two names
    ("net = Net()\nnet.conv.out_channels = 5\n\ndef model() -> nn.Module:\n    return net\n", 5),  # returns it
    ("def model() -> nn.Module:\n    return Net(width=6)\n", 6),       # a factory beats the class it builds
    ("def model() -> Net:\n    return Net(width=6)\n\nalias = model\n", 6),
], ids=["class-alias", "instance-alias", "factory-of-the-instance", "factory", "factory-alias"])
def test_two_names_for_one_model_are_one_candidate(tmp_path, tail, width):
    loaded = load_model(str(model_file(tmp_path, NET + "\n\n" + tail)))
    assert type(loaded.model).__name__ == "Net" and loaded.model.conv.out_channels == width


def test_two_factories_are_still_two_models(tmp_path):
    source = NET + "\n\ndef small() -> nn.Module:\n    return Net(2)\n\n\ndef large() -> nn.Module:\n    return Net(8)\n"
    with pytest.raises(LoadError) as excinfo:
        load_model(str(model_file(tmp_path, source)))
    error = assert_error(excinfo, LoadError, "several", "small", "large")
    assert "Net" not in error.message.split(":")[-1].split(", ")


def test_loaded_has_no_label_field():
    from dataclasses import fields

    from cspify.load import Loaded

    assert [f.name for f in fields(Loaded)] == ["model", "example_inputs", "mean", "std", "normalisation_from"]


def test_zoo_models_say_their_input_normalisation():
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    timm_model = load_model("timm:resnet18", (1, 3, 32, 32))
    assert (timm_model.mean, timm_model.std) == imagenet and timm_model.normalisation_from == "timm's pretrained_cfg"
    vision = load_model("torchvision:resnet18", (1, 3, 32, 32))
    assert (vision.mean, vision.std) == imagenet and "torchvision" in vision.normalisation_from
    plain = load_model(str(EXAMPLES / "resnet_like.py"))
    assert plain.mean is plain.std is None and plain.normalisation_from == ""


# ---------------------------------------------------------------- trained weights


def trained_net(**kwargs) -> nn.Module:
    torch.manual_seed(7)
    model = load_model(str(model_file(kwargs.pop("folder"), BLOCK_AND_NET))).model
    for p in model.parameters():
        p.data.normal_()
    return model


@pytest.mark.parametrize("wrap", [
    lambda s: s,
    lambda s: {"state_dict": s, "epoch": 3},
    lambda s: {"model": s, "optimizer": {"lr": 0.1}},
    lambda s: {f"module.{k}": v for k, v in s.items()},            # saved from DistributedDataParallel
    lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
], ids=["state-dict", "checkpoint-state_dict", "checkpoint-model", "ddp-prefix", "checkpoint-ddp"])
def test_weights_load_into_the_built_model(tmp_path, wrap):
    trained = trained_net(folder=tmp_path)
    torch.save(wrap(trained.state_dict()), tmp_path / "w.pt")
    loaded = load_model(str(tmp_path / "model.py"), weights=str(tmp_path / "w.pt"))
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert not loaded.model.training


def test_load_weights_is_public_and_returns_the_model(tmp_path):
    from cspify.load import load_weights

    trained = trained_net(folder=tmp_path)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    fresh = load_model(str(tmp_path / "model.py")).model
    assert load_weights(fresh, str(tmp_path / "w.pt")) is fresh
    assert torch.equal(fresh.stem.weight, trained.stem.weight)


def test_weights_into_a_zoo_model(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    trained = torchvision.models.resnet18(num_classes=10)
    torch.save(trained.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(LoadError) as excinfo:  # the zoo builds 1000 classes
        load_model("torchvision:resnet18", weights=str(tmp_path / "r18.pth"))
    assert_error(excinfo, LoadError, "'fc.weight'", "10x512", "1000x512")


def _weights_error(tmp_path, saved, *words, raw: bytes | None = None):
    model_file(tmp_path, BLOCK_AND_NET)
    path = tmp_path / "w.pt"
    if raw is not None:
        path.write_bytes(raw)
    elif saved is not None:
        torch.save(saved, path)
    with pytest.raises(LoadError) as excinfo:
        load_model(str(tmp_path / "model.py"), weights=str(path))
    return assert_error(excinfo, LoadError, *words)


class NotATensor:
    pass


def test_weights_that_do_not_fit_name_the_first_key(tmp_path):
    state = trained_net(folder=tmp_path).state_dict()
    missing = {k: v for k, v in state.items() if k != "stem.weight"}
    _weights_error(tmp_path, missing, "'stem.weight'", "lacks")
    extra = {**state, "head.weight": torch.zeros(2)}
    _weights_error(tmp_path, extra, "'head.weight'", "unexpected")
    both = {("trunk" + k[4:] if k.startswith("stem") else k): v for k, v in state.items()}
    _weights_error(tmp_path, both, "'stem.weight'", "lacks", "'trunk.weight'", "unexpected", "1 more")
    wrong = {**state, "stem.weight": torch.zeros(4, 3, 3, 3)}
    _weights_error(tmp_path, wrong, "'stem.weight'", "4x3x3x3", "8x3x3x3")


def test_weights_files_that_cannot_be_read(tmp_path):
    _weights_error(tmp_path, None, "does not exist")
    _weights_error(tmp_path, None, "cannot read", raw=b"not a torch file")
    _weights_error(tmp_path, None, "not a file torch.save wrote", raw=b"hello")  # a pickle reader's KeyError: 101
    _weights_error(tmp_path, None, "cannot read", raw=bytes(range(256)) * 8)
    _weights_error(tmp_path, {"net": NotATensor()}, "NotATensor", "weights_only=True")
    _weights_error(tmp_path, [torch.zeros(1)], "list", "not a state dict")
    _weights_error(tmp_path, {"epoch": 3, "lr": 0.1}, "no tensors", "'epoch'")
    (tmp_path / "wdir").mkdir()
    with pytest.raises(LoadError, match="folder"):
        load_model(str(tmp_path / "model.py"), weights=str(tmp_path / "wdir"))


def test_a_torchvision_detector_loads_offline_with_random_weights_throughout():
    """A detection builder would fetch its backbone's ImageNet weights unless told not to."""
    pytest.importorskip("torchvision")
    model = load_model("torchvision:retinanet_resnet50_fpn").model
    assert type(model).__name__ == "RetinaNet"
