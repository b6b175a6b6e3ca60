"""The split by importance: the images choose which base channels run through a stage
(cspify.importance), the output keeps each channel in its place, and calibration,
fine-tuning, the report and the exports follow the channels chosen."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

import cspify
from cspify.calibrate import calibrate
from cspify.errors import ConfigError
from cspify.export import write_onnx
from cspify.finetune import finetune
from cspify.importance import Importance, through_of
from cspify.taps import tapping
from tiny_models import TinyDenseNet, TinyResNet, randomize_norms, seeded

IMAGES = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
STILL = (0, 2, 5, 7)  # the channels a residual stage's blocks leave as they are


def resnet_leaving_still() -> TinyResNet:
    """A TinyResNet whose layer1 blocks add nothing to the channels STILL (their last norm's
    weight and bias are 0 there), so that the stage output is its input on them."""
    model = randomize_norms(seeded(TinyResNet)).eval()
    with torch.no_grad():
        for block in model.layer1:
            norm = block.expand[1]
            norm.weight[list(STILL)] = 0
            norm.bias[list(STILL)] = 0
    return model


def stage(record, name):
    return next(s for s in record.stages if s.name == name)


def test_the_channels_a_residual_stage_leaves_as_they_are_take_the_bypass():
    model = resnet_leaving_still()
    csp = cspify.convert(model, IMAGES[:2], data=IMAGES, split="importance")
    layer1 = stage(cspify.conversion_of(csp), "layer1")
    assert layer1.converted and layer1.bypass_channels == len(STILL)
    assert set(range(layer1.channels)) - set(layer1.through_index) == set(STILL)
    assert layer1.output_index == layer1.through_index  # each through channel back at its place
    assert any("split by importance" in note for note in layer1.notes)
    assert cspify.conversion_of(csp).summary()["split"] == "importance (64 images)"
    # the bypass channels are the stage output at their own positions, before any fitting
    traced = torch.fx.symbolic_trace(model)
    with tapping(traced, [layer1.output]) as theirs:
        traced(IMAGES[:4])
    with tapping(csp, [layer1.converted_output]) as mine:
        csp(IMAGES[:4])
    still = list(STILL)
    assert torch.equal(mine[layer1.converted_output][:, still], theirs[layer1.output][:, still])
    assert csp(IMAGES[:3]).shape == model(IMAGES[:3]).shape


def test_split_last_and_no_images_keep_the_last_channels():
    model = resnet_leaving_still()
    for csp in (cspify.convert(model, IMAGES[:2], data=IMAGES), cspify.convert(model, IMAGES[:2], split="importance")):
        record = cspify.conversion_of(csp)
        assert all(s.through_index is None and s.output_index is None for s in record.converted)
        assert "split" not in record.summary()


def test_a_dense_stage_runs_the_channels_its_layers_read_through():
    model = randomize_norms(seeded(TinyDenseNet)).eval()
    unread = [1, 3, 4, 6]  # no layer of block1 reads these base channels
    with torch.no_grad():
        for layer in model.block1.values():
            layer.conv1.weight[:, unread] = 0
        model.trans1.conv.weight[:, unread] = 0  # the transition reads them too, in the block's concat
    csp = cspify.convert(model, IMAGES[:2], data=IMAGES, kinds="dense", split="importance")
    block1 = stage(cspify.conversion_of(csp), "block1")
    assert block1.converted and set(range(block1.channels)) - set(block1.through_index) == set(unread)
    assert block1.output_index is None  # the transition's output channels are not the base's
    assert csp(IMAGES[:2]).shape == model(IMAGES[:2]).shape


def test_calibration_and_finetuning_fit_the_channels_chosen(tmp_path):
    model = resnet_leaving_still()
    csp = cspify.convert(model, IMAGES[:2], data=IMAGES, split="importance")
    last = cspify.convert(model, IMAGES[:2], split="last")
    for converted in (csp, last):
        calibrate(model, converted, IMAGES, max_images=64)
    errors = {name: [f.error_after for f in c.meta["cspify.calibrate"].fits if f.role == "partial transition"]
              for name, c in (("importance", csp), ("last", last))}
    assert errors["importance"] and max(errors["importance"]) < 1.0
    with torch.no_grad():
        gap = float((csp(IMAGES) - model(IMAGES)).square().mean() / model(IMAGES).var())
    assert gap < 0.5
    labels = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(1))
    tuned = finetune(copy.deepcopy(csp), TensorDataset(IMAGES, labels), teacher=model, epochs=1, batch_size=16,
                     progress=False, checkpoint=tmp_path / "run.ckpt")
    assert tuned.meta["cspify.finetune"].epochs
    # a checkpoint resumed into a model that runs other channels through is refused
    with pytest.raises(ConfigError, match="other channels through"):
        finetune(last, TensorDataset(IMAGES, labels), teacher=model, epochs=2, batch_size=16, progress=False,
                 resume=tmp_path / "run.ckpt")


def test_the_report_and_the_onnx_export_follow_the_split(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = resnet_leaving_still()
    csp = cspify.convert(model, IMAGES[:2], data=IMAGES, split="importance")
    last = cspify.convert(model, IMAGES[:2], split="last")
    # the same widths: the same flops and parameters, whichever channels run through; the
    # gathered through part is one copy more of memory traffic, which the report counts
    chosen, kept = (cspify.compare(model, m, IMAGES[:2]).converted for m in (csp, last))
    assert (chosen.flops, chosen.params) == (kept.flops, kept.params)
    assert chosen.memory_bytes > kept.memory_bytes
    path = tmp_path / "m.onnx"
    write_onnx(csp.eval(), (IMAGES[:2],), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: IMAGES[:5].numpy()})
    with torch.no_grad():
        want = csp(IMAGES[:5]).numpy()
    assert abs(got - want).max() < 1e-4


def test_images_that_do_not_fit_the_model_are_refused_in_one_sentence():
    model = resnet_leaving_still()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError) as refused:
        cspify.convert(model, IMAGES[:2], data=torch.randn(8, 1, 16, 16), split="importance")
    assert refused.value.message.count(". ") == 0 and "split by importance" in refused.value.message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_through_of_takes_the_highest_scores_and_ties_go_to_the_last_channels():
    assert through_of(torch.tensor([0.1, 0.9, 0.5, 0.7]), 2) == (1, 3)
    assert through_of(torch.zeros(6), 3) == (3, 4, 5)


def test_a_budget_measures_each_stage_once():
    model = resnet_leaving_still()
    importance = Importance(IMAGES)
    csp = cspify.convert(model, IMAGES[:2], target_flops=0.9, data=importance, split="importance")
    record = cspify.conversion_of(csp)
    assert set(importance.measured) >= {s.name for s in record.converted}
    assert all(s.through_index is not None for s in record.converted if s.name == "layer1")
