"""finetune and evaluate on tiny models and random images: losses fall (with labels, and
without them by distillation alone); a run stopped by Ctrl-C leaves its last complete
checkpoint and resuming from it ends with the weights of an uninterrupted run; bad
arguments are one ConfigError sentence."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import cspify
from cspify.errors import ConfigError
from cspify.finetune import Recipe, evaluate, finetune
from test_cli import cli
from tiny_models import TinyResNet, randomize_norms, seeded

X = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def teacher():
    return randomize_norms(seeded(TinyResNet))


@pytest.fixture(scope="module")
def labels():
    return torch.randint(0, 5, (len(X),), generator=torch.Generator().manual_seed(1))


def fresh(teacher):
    return cspify.convert(teacher, X[:2])


def test_losses_fall_with_labels_and_distillation(teacher, labels):
    model = fresh(teacher)
    data = TensorDataset(X, labels)
    finetune(model, data, teacher=teacher, epochs=4, batch_size=16, lr=0.1, val_data=data, progress=False)
    run = model.meta["cspify.finetune"]
    losses = [e.loss for e in run.epochs]
    assert losses[-1] < 0.8 * losses[0] and losses == sorted(losses, reverse=True), losses
    first, last = run.epochs[0], run.epochs[-1]
    assert last.ce < first.ce and last.kd < first.kd and last.feature < first.feature
    assert last.val_top1 is not None and last.images == 64 and last.images_per_s > 0
    assert run.settings["stages"] == ["layer1", "layer2"] and not model.training
    json.dumps(run.to_dict())


def test_a_run_that_ends_worse_hands_back_the_best(teacher, labels, monkeypatch):
    """Scores that fall epoch by epoch (fed in, so that the test does not hang on training
    noise): keep='best' hands back the model before fine-tuning, keep='last' the last."""
    module = importlib.import_module("cspify.finetune")  # the module: cspify.finetune is also the function

    data = TensorDataset(X, labels)
    for keep, kept in [("best", "before fine-tuning"), ("last", "epoch 2")]:
        scores = iter([0.8, 0.5, 0.3])
        monkeypatch.setattr(module, "evaluate", lambda *args, **kwargs: next(scores))
        model = fresh(teacher)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        finetune(model, data, teacher=teacher, epochs=2, batch_size=16, lr=0.1, val_data=data, progress=False, keep=keep)
        run = model.meta["cspify.finetune"]
        assert run.worse and run.kept == kept and run.kept_top1 == (0.8 if keep == "best" else 0.3)
        same = all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
        assert same == (keep == "best")
    with pytest.raises(ConfigError, match="keep is 'best' or 'last'"):
        finetune(fresh(teacher), data, keep="first")


def test_max_steps_ends_a_run_early(teacher, labels):
    model = fresh(teacher)
    finetune(model, TensorDataset(X, labels), teacher=teacher, epochs=2, batch_size=16, lr=0.1, progress=False,
             max_steps=3)
    run = model.meta["cspify.finetune"]
    assert [e.images for e in run.epochs] == [48] and run.epochs[0].lr == 0.0  # the schedule ended with the steps
    with pytest.raises(ConfigError, match="max_steps must be at least 1"):
        finetune(fresh(teacher), TensorDataset(X, labels), max_steps=0)


def test_without_labels_distillation_alone_trains(teacher):
    model = fresh(teacher)
    finetune(model, TensorDataset(X), teacher=teacher, epochs=3, batch_size=16, lr=0.1, progress=True)
    run = model.meta["cspify.finetune"]
    assert all(e.ce is None and e.kd is not None and e.feature is not None for e in run.epochs)
    losses = [e.loss for e in run.epochs]
    assert losses[-1] < 0.9 * losses[0] and losses == sorted(losses, reverse=True), losses


def test_plain_batches_and_loaders(teacher, labels):
    batches = list(zip(X.split(16), labels.split(16)))
    model = fresh(teacher)
    finetune(model, batches, teacher=teacher, epochs=1, progress=False)  # any re-iterable of (inputs, labels)
    assert model.meta["cspify.finetune"].epochs[0].images == 64
    loader = DataLoader(TensorDataset(X, labels), batch_size=32, shuffle=True)
    finetune(model, loader, epochs=1, progress=False)  # labels only, no teacher
    run = model.meta["cspify.finetune"]
    assert run.epochs[0].kd is None and run.settings["global_batch"] == 32
    assert 0 <= evaluate(model, loader) <= 1
    with torch.no_grad():
        manual = float((model.eval()(X).argmax(1) == labels).float().mean())
    assert evaluate(model, TensorDataset(X, labels)) == pytest.approx(manual)


class StopAt(Dataset):
    """Raises KeyboardInterrupt (as Ctrl-C would) at the ``stop``-th item read, if any."""

    def __init__(self, x, y, stop=None):
        self.x, self.y, self.stop, self.read = x, y, stop, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.read += 1
        if self.stop is not None and self.read == self.stop:
            raise KeyboardInterrupt
        return self.x[i], self.y[i]


def test_ctrl_c_then_resume_ends_where_an_uninterrupted_run_ends(teacher, labels, tmp_path):
    options = dict(teacher=teacher, epochs=2, batch_size=16, lr=0.05, progress=False, seed=3)
    straight = fresh(teacher)
    finetune(straight, StopAt(X, labels), checkpoint=tmp_path / "straight.pt", **options)

    stopped = fresh(teacher)
    with pytest.raises(KeyboardInterrupt):  # in epoch 2, after epoch 1's checkpoint
        finetune(stopped, StopAt(X, labels, stop=64 + 40), checkpoint=tmp_path / "run.pt", **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt", "straight.pt"]  # no temporary file left
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    assert saved["epoch"] == 1 and len(saved["run"]["epochs"]) == 1

    resumed = fresh(teacher)  # a new process would convert again, then resume
    finetune(resumed, StopAt(X, labels), checkpoint=tmp_path / "run.pt", resume=tmp_path / "run.pt", **options)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    a, b = straight.meta["cspify.finetune"], resumed.meta["cspify.finetune"]
    assert [e.loss for e in a.epochs] == [e.loss for e in b.epochs]
    assert b.settings["resumed_at_epoch"] == 1


def test_bad_arguments(teacher, labels, tmp_path):
    model = fresh(teacher)
    with pytest.raises(ConfigError, match="nothing to train on"):
        finetune(model, TensorDataset(X), progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        finetune(model, TensorDataset(X, labels), resume=tmp_path / "none.pt", progress=False)
    with pytest.raises(ConfigError, match="one-shot iterator"):
        finetune(model, iter([X]), teacher=teacher, progress=False)
    with pytest.raises(ConfigError, match="epochs"):
        finetune(model, TensorDataset(X, labels), epochs=0, progress=False)
    with pytest.raises(ConfigError, match="recipe"):
        finetune(model, TensorDataset(X, labels), recipe=Recipe(optimizer="lion"), progress=False)
    other = cspify.convert(teacher, X[:2], gamma=0.25)
    finetune(other, TensorDataset(X, labels), epochs=1, checkpoint=tmp_path / "other.pt", progress=False)
    with pytest.raises(ConfigError, match="does not fit this model"):
        finetune(model, TensorDataset(X, labels), resume=tmp_path / "other.pt", progress=False)



def test_any_model_trains_on_logits_alone(teacher, labels):
    """A model cspify did not make (a pruned baseline, say) gets the same recipe without stages."""
    import copy

    student = copy.deepcopy(teacher)
    before = copy.deepcopy(teacher.state_dict())
    finetune(student, TensorDataset(X, labels), teacher=teacher, epochs=2, batch_size=16, lr=0.1, progress=False)
    run = student.meta["cspify.finetune"]
    assert run.settings["stages"] == [] and run.epochs[-1].feature is None and run.epochs[-1].kd is not None
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the teacher is untouched


# ---------------------------------------------------------------- the command line

NET = """
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                               nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.f(x))


class Net(nn.Module):
    def __init__(self, channels=CHANNELS, classes=3):
        super().__init__()
        torch.manual_seed(0)  # the same weights in every run: a resumed run converts as the first did
        self.stem = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))
"""


@pytest.fixture
def cli_setup(tmp_path, monkeypatch):
    from test_data import idx_folder

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    (tmp_path / "net.py").write_text(NET.replace("CHANNELS", "1"))
    (tmp_path / "rgb.py").write_text(NET.replace("CHANNELS", "3"))
    idx_folder(tmp_path / "data", n_train=24, n_val=12, classes=3)
    idx_folder(tmp_path / "five", n_train=24, n_val=12, classes=5)
    yield tmp_path
    torch.set_num_threads(threads)


def test_cli_finetune_then_resume(cli_setup):
    common = ["net.py:Net", "--data", "data", "--batch-size", "8", "--calibration-images", "16", "--allow-chance", "-q"]
    result = cli("finetune", *common, "-o", "csp.pt", "--json", "run.json")
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    assert "top-1 (val)" in result.stdout and "flops" in result.stdout and "saved" in result.stdout
    record = json.loads((cli_setup / "run.json").read_text())
    assert set(record) >= {"data", "original", "converted", "calibration", "finetune"}
    assert record["converted"]["flops"] < record["original"]["flops"] and len(record["finetune"]["epochs"]) == 1
    assert (cli_setup / "csp.pt.ckpt").exists() and isinstance(torch.load("csp.pt", weights_only=False),
                                                             torch.nn.Module)
    result = cli("finetune", *common, "--epochs", "2", "--resume", "csp.pt.ckpt", "-o", "more.pt", "--json", "more.json")
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    assert [e["epoch"] for e in json.loads((cli_setup / "more.json").read_text())["finetune"]["epochs"]] == [1, 2]


@pytest.mark.parametrize("model, data, words", [
    ("net.py:Net", "nowhere", ["does not exist"]),
    ("net.py:Net", "five", ["5 classes", "only 3 outputs"]),
    ("rgb.py:Net", "data", ["takes 3-channel images", "1-channel images"]),
], ids=["missing-folder", "more-classes-than-outputs", "wrong-channels"])
def test_cli_bad_data(cli_setup, model, data, words):
    result = cli("finetune", model, "--data", data, "-o", "csp.pt", "-q")
    assert result.exit_code == 7, result.stderr + repr(result.exception)
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: ") and len(lines) == 2, result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not (cli_setup / "csp.pt").exists()


def test_cli_convert_calibrate(cli_setup):
    result = cli("convert", "net.py:Net", "--input-shape", "1,1,8,8", "--calibrate", "data", "--split", "importance",
                 "-o", "csp.pt")
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    assert "calibrating on 24 images" in result.stderr
    assert cli("convert", "net.py:Net", "--input-shape", "1,1,8,8", "-o", "plain.pt").exit_code == 0
    calibrated, plain = (torch.load(p, weights_only=False).state_dict() for p in ("csp.pt", "plain.pt"))
    assert not all(torch.equal(v, plain[k]) for k, v in calibrated.items())
    assert "input normalisation none (images in [0, 1]) (the default: the model says nothing)" in result.stderr
    # the images chose the split first: the report says how many it read
    assert "measuring the split on the images" in result.stderr and "split=importance (24 images)" in result.output
    last = cli("convert", "net.py:Net", "--input-shape", "1,1,8,8", "--calibrate", "data", "-o", "last.pt")
    assert last.exit_code == 0 and "split=" not in last.output


def test_cli_budget_that_reads_accuracy_needs_enough_images(cli_setup):
    """--target-flops with --calibrate DATA judges every option on DATA's images: 24 are too
    few, and the sentence says how many it needs; nothing is written."""
    result = cli("convert", "net.py:Net", "--input-shape", "1,1,8,8", "--target-flops", "0.8", "--calibrate", "data",
                 "-o", "csp.pt")
    assert result.exit_code == 2, result.stderr
    assert "at least 64 images" in result.stderr and "has 24" in result.stderr
    assert not (cli_setup / "csp.pt").exists()


def test_cli_convert_calibrate_normalises_as_told(cli_setup):
    result = cli("convert", "net.py:Net", "--input-shape", "1,1,8,8", "--calibrate", "data", "--mean", "0.5",
                 "--std", "0.25", "-o", "csp.pt")
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    assert "input normalisation mean 0.5, std 0.25 (--mean/--std)" in result.stderr
    saved = torch.load(cli_setup / "csp.pt", weights_only=False)
    assert saved.meta["cspify.inputs"] == {"mean": [0.5], "std": [0.25]}  # evaluate reads it back
    # --mean without --calibrate says nothing to read: refused before any work
    refused = cli("convert", "net.py:Net", "--input-shape", "1,1,8,8", "--mean", "0.5", "--std", "0.25", "-o", "x.pt")
    assert refused.exit_code != 0 and "--calibrate" in refused.stderr and not (cli_setup / "x.pt").exists()


def test_cli_calibrate_only(cli_setup):
    result = cli("finetune", "net.py:Net", "--data", "data", "--epochs", "0", "-o", "csp.pt", "--json", "run.json",
                 "--allow-chance", "-q")
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    record = json.loads((cli_setup / "run.json").read_text())
    assert record["finetune"] is None and record["calibration"]["fits"]
    assert record["converted"]["top1"] == record["converted"]["top1_before_finetune"] is not None


@pytest.mark.parametrize("where, said", [("finetune", "no checkpoint was written"), ("calibrate", None)])
def test_cli_stop_before_an_epoch_promises_no_checkpoint(cli_setup, monkeypatch, where, said):
    import cspify.recovery

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cspify.recovery, where, stop)
    result = cli("finetune", "net.py:Net", "--data", "data", "--batch-size", "8", "-o", "csp.pt", "--allow-chance", "-q")
    assert result.exit_code == 130, result.stderr + repr(result.exception)
    assert "--resume" not in result.stderr and not (cli_setup / "csp.pt.ckpt").exists(), result.stderr
    assert (said in result.stderr) if said else "checkpoint" not in result.stderr, result.stderr
    assert "interrupted by Ctrl-C" in result.stderr and not (cli_setup / "csp.pt").exists()


def test_cli_stop_after_an_epoch_names_its_checkpoint(cli_setup, monkeypatch):
    import cspify.recovery

    real = cspify.recovery.finetune

    def one_epoch_then_stop(*args, **kwargs):
        real(*args, **dict(kwargs, epochs=1))
        raise KeyboardInterrupt

    monkeypatch.setattr(cspify.recovery, "finetune", one_epoch_then_stop)
    result = cli("finetune", "net.py:Net", "--data", "data", "--batch-size", "8", "--epochs", "2", "-o", "csp.pt",
                 "--allow-chance", "-q")
    assert result.exit_code == 130, result.stderr + repr(result.exception)
    assert "the 1 epoch(s) completed before the stop are in csp.pt.ckpt" in result.stderr, result.stderr
    assert (cli_setup / "csp.pt.ckpt").exists() and not (cli_setup / "csp.pt").exists()


def test_cli_says_loudly_when_fine_tuning_made_it_worse(cli_setup, monkeypatch):
    module = importlib.import_module("cspify.finetune")  # the module: cspify.finetune is also the function

    scores = iter([0.9, 0.6, 0.9, 0.4])  # the original, then before fine-tuning and each epoch
    monkeypatch.setattr(module, "evaluate", lambda *args, **kwargs: next(scores))
    monkeypatch.setattr("cspify.recovery.evaluate", module.evaluate)
    result = cli("finetune", "net.py:Net", "--data", "data", "--batch-size", "8", "--epochs", "2", "-o", "csp.pt",
                 "--json", "run.json")
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    assert "epoch 1/2: loss" in result.stderr and "epoch 2/2: loss" in result.stderr
    assert ("warning: fine-tuning ended at 40.00% top-1, below the 60.00% it started from; the model saved is that "
            "of epoch 1 (90.00%)") in result.stderr, result.stderr
    record = json.loads((cli_setup / "run.json").read_text())
    assert record["converted"]["top1"] == 0.9 and record["finetune"]["kept"] == "epoch 1"


def test_cli_evaluate_scores_a_saved_model(cli_setup):
    args = ["net.py:Net", "--data", "data", "--epochs", "0", "--allow-chance", "-o", "csp.pt", "--json", "run.json",
            "--mean", "0.5", "--std", "0.25", "-q"]
    assert cli("finetune", *args).exit_code == 0
    record = json.loads((cli_setup / "run.json").read_text())
    result = cli("evaluate", "csp.pt", "--data", "data", "--json", "top1.json")
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    assert f"top-1 (val) {100 * record['converted']['top1']:.2f}% on 12 images" in result.stdout
    assert "input normalisation mean 0.5, std 0.25 (what the model was fitted on)" in result.stderr, result.stderr
    scored = cli("evaluate", "csp.pt", "--data", "data", "--mean", "none", "--std", "none", "-q")
    assert scored.exit_code == 0 and json.loads((cli_setup / "top1.json").read_text())["top1"] is not None
    (cli_setup / "junk.pt").write_bytes(b"not a model")
    for bad, words in [("missing.pt", "does not exist"), ("junk.pt", "cannot read the model file")]:
        result = cli("evaluate", bad, "--data", "data", "-q")
        assert result.exit_code == 3 and result.stderr.startswith(f"error: the model file {bad!r}" if bad == "missing.pt"
                                                                   else "error: cannot read"), result.stderr
        assert words in result.stderr


def test_cli_short_runs(cli_setup):
    result = cli("finetune", "net.py:Net", "--data", "data", "--batch-size", "4", "--fraction", "0.5", "--max-steps", "2",
                 "--allow-chance", "-o", "csp.pt", "--json", "run.json", "-q")
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    record = json.loads((cli_setup / "run.json").read_text())
    assert record["data"]["train"] == 12 and record["calibration"]["images"] == 12
    assert [e["images"] for e in record["finetune"]["epochs"]] == [8]
    assert cli("finetune", "net.py:Net", "--data", "data", "--fraction", "0", "-o", "x.pt").exit_code == 2


def test_cli_refuses_an_original_at_chance_before_training(cli_setup):
    result = cli("finetune", "net.py:Net", "--data", "data", "--batch-size", "8", "-o", "csp.pt", "--json", "r.json")
    assert result.exit_code == 7, result.stderr + repr(result.exception)
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert "about chance" in error and "normalised none (images in [0, 1])" in error, error
    assert "--allow-chance" in result.stderr and "--mean/--std" in result.stderr
    assert "calibrating" not in result.stderr and not list(cli_setup.glob("csp.pt*")) and not (cli_setup / "r.json").exists()


def test_cli_normalisation_is_explicit_printed_and_kept(cli_setup):
    args = ["net.py:Net", "--data", "data", "--epochs", "0", "--allow-chance", "-o", "csp.pt", "--json", "run.json"]
    result = cli("finetune", *args)
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    assert "input normalisation none (images in [0, 1]) (the default: the model says nothing)" in result.stderr
    result = cli("finetune", *args, "--mean", "0.5", "--std", "0.25", "--force")
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    assert "input normalisation mean 0.5, std 0.25 (--mean/--std)" in result.stderr
    record = json.loads((cli_setup / "run.json").read_text())
    assert record["data"]["mean"] == [0.5] and record["data"]["std"] == [0.25]
    bad = cli("finetune", *args, "--mean", "0.5", "--force")
    assert bad.exit_code == 7 and "--mean and --std come together" in bad.stderr, bad.stderr


def test_recover_is_the_pipeline_the_command_runs(cli_setup):
    from cspify.data import open_data

    net = {}
    exec((cli_setup / "net.py").read_text(), net)
    data = open_data("data")
    done = cspify.recover(net["Net"](), torch.randn(1, 1, *data.size), data, epochs=0, calibration_images=16,
                          allow_chance=True)
    record = done.to_dict()
    assert record["finetune"] is None and record["calibration"]["images"] == 16
    assert record["converted"]["top1"] == done.top1 == done.top1_before is not None
    assert done.csp.meta["cspify.inputs"] == {"mean": [], "std": []}  # the normalisation it was fitted on: none
    assert "top-1 (val)" in str(done) and "% saved" in done.table()


def test_scope_conversion_distils_its_stages():
    from test_calibrate import Wrapped

    model = randomize_norms(seeded(Wrapped))
    converted = cspify.convert(model, X[:2], scope="backbone")
    labels = torch.randint(0, 4, (len(X),), generator=torch.Generator().manual_seed(2))
    finetune(converted, TensorDataset(X, labels), teacher=model, epochs=1, batch_size=16, progress=False)
    run = converted.backbone.meta["cspify.finetune"]
    assert run.settings["stages"] == ["stage1"] and run.epochs[0].feature is not None
