"""The training command: the default run end to end (short), every model and optimizer, bit-exact
resume, and bad input rejected in one line before any work."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwp_kernels.models import MODELS
from rwp_kernels.train.cli import main
from rwp_kernels.train.data import load_data
from rwp_kernels.train.netbuild import build_network


def train(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "rwp_kernels.train", "--out-dir", str(tmp_path / "out"),
                           "--no-progress", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_default_run_short(tmp_path):
    out = train(tmp_path, "--epochs", "2")
    assert out.returncode == 0, out.stderr
    table = out.stdout[out.stdout.index("optimizer  seeds"):]
    assert "sgd" in table and "rwp" in table and "time vs sgd" in table
    experiment = tmp_path / "out" / "digits-small_cnn"
    for method in ("sgd", "rwp"):
        records = read_log(experiment / f"{method}-seed0" / "log.jsonl")
        assert [r["epoch"] for r in records] == [1, 2]
        assert all(0 <= r["test_acc"] <= 1 and r["epoch_time"] > 0 for r in records)
    summary = json.loads((experiment / "summary.json").read_text())
    assert {r["optimizer"] for r in summary["results"]} == {"sgd", "rwp"}
    assert summary["settings"]["dataset"] == "digits"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS) + ["torchvision:resnet18", "mobilenet_v3_small"])
def test_every_model_trains_a_step(name):
    data = load_data("digits") if name == "small_cnn" else load_data("synthetic", synthetic_train=8, synthetic_size=32)
    torch.manual_seed(0)
    model = build_network(name, data)
    if name.startswith("torchvision:"):
        assert type(model).__module__.startswith("torchvision"), "the prefix selects torchvision's network"
    x = torch.stack([data.train[i][0] for i in range(4)])
    y = torch.tensor([int(data.train[i][1]) for i in range(4)])
    out = model(x)
    assert out.shape == (4, data.num_classes)
    torch.nn.functional.cross_entropy(out, y).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "rwp", "arwp", "sam"])
def test_each_optimizer_learns_digits(tmp_path, optimizer):
    code = main(["--optimizer", optimizer, "--epochs", "3", "--out-dir", str(tmp_path), "--no-progress"])
    assert code == 0
    record = read_log(tmp_path / "digits-small_cnn" / f"{optimizer}-seed0" / "log.jsonl")[-1]
    assert record["test_acc"] > 0.6, record  # chance is 0.1


@pytest.mark.slow
def test_resume_matches_the_uninterrupted_run(tmp_path):
    common = ["--optimizer", "rwp", "--epochs", "3", "--no-progress"]
    assert main(common + ["--out-dir", str(tmp_path / "a")]) == 0
    assert main(common + ["--out-dir", str(tmp_path / "b"), "--stop-after", "1"]) == 0
    assert len(read_log(tmp_path / "b" / "digits-small_cnn" / "rwp-seed0" / "log.jsonl")) == 1
    assert main(common + ["--out-dir", str(tmp_path / "b"), "--resume"]) == 0
    runs = [tmp_path / d / "digits-small_cnn" / "rwp-seed0" for d in ("a", "b")]
    ckpts = [torch.load(r / "checkpoint.pt", weights_only=True) for r in runs]
    for key, value in ckpts[0]["model"].items():
        assert torch.equal(value, ckpts[1]["model"][key]), key
    logs = [read_log(r / "log.jsonl") for r in runs]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_s")} for r in rs]
    assert strip(logs[0]) == strip(logs[1])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "resnet1000"], "unknown model 'resnet1000'"),
        (["--dataset", "cifar10", "--data-dir", "nowhere"], "cifar10 not found under"),
        (["--dataset", "imagenet-folder", "--data-dir", "nowhere"], "imagenet-folder expects"),
        (["--batch-size", "5000"], "--batch-size 5000 is larger than the 1433 training images"),
        (["--out-dir", "afile/sub"], "afile"),
        (["--parallel"], "--parallel runs one process per device under torchrun"),
        (["--parallel", "--optimizer", "rwp", "arwp"], "--parallel does not run arwp"),
        (["--parallel", "--optimizer", "sam"], "--parallel does not run sam"),
        (["--parallel", "--alpha", "1"], "--parallel needs 0 < --alpha < 1"),
        (["--parallel", "--rwp-schedule", "consecutive"], "--rwp-schedule consecutive does not apply to --parallel"),
        (["--optimizer", "sgd", "rwp", "--backend", "cuda", "--device", "cpu"], "--backend cuda cannot run on cpu"),
        (["--optimizer", "sgd", "rwp", "sgd"], "--optimizer names sgd more than once"),
        (["--seeds", "0", "1", "0"], "--seeds names 0 more than once"),
        (["--model", "vgg16_bn"], "--model vgg16_bn does not run on digits images"),
        (["--model", "torchvision:resnet18"], "--model torchvision:resnet18 does not run on digits images"),
        (["--nesterov", "--momentum", "0"], "--optimizer sgd: Nesterov momentum requires a momentum"),
        (["--device", "cuda:7"], "--device cuda:7 asked for"),
        (["--rwp-schedule", "consecutive", "--batch-size", "800"], "update of two batches of 800"),
        (["--out-dir", "afile"], "cannot write in afile/digits-small_cnn"),
    ],
)
def test_bad_input_fails_fast_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "afile").write_text("not a directory")
    monkeypatch.chdir(tmp_path)
    out_dir = [] if "--out-dir" in args else ["--out-dir", str(tmp_path / "out")]
    assert main(["--no-progress", *out_dir, *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("rwp_kernels.train: error:"), captured.err
    assert "epoch" not in captured.out, "no training may start"


@pytest.mark.slow
def test_bad_input_exit_status_from_the_command_line(tmp_path):
    out = train(tmp_path, "--model", "nope")
    assert out.returncode == 2 and "unknown model 'nope'" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--optimizer", "sgd", "rwp", "--backend", "cuda", "--device", "cpu"], "--backend cuda cannot run on cpu"),
    (["--seeds", "0", "-1"], "argument --seeds: must be in [0, 2**32), got -1"),
    (["--workers", "-1"], "argument --workers: must be >= 0, got -1"),
])
def test_errors_that_used_to_come_after_training_come_first(tmp_path, args, message):
    out = train(tmp_path, "--epochs", "1", *args)
    assert out.returncode == 2 and message in out.stderr.strip().splitlines()[-1], out.stderr
    assert "Traceback" not in out.stderr and "epoch" not in out.stdout
    assert not (tmp_path / "out" / "digits-small_cnn" / "summary.json").exists()


def _fails_before_training(out_dir, capsys, *args) -> str:
    assert main(["--no-progress", "--out-dir", str(out_dir), *args]) == 2
    captured = capsys.readouterr()
    assert "epoch" not in captured.out, "no training may start"
    return captured.err


def test_a_run_folder_that_cannot_be_written_fails_before_any_run(tmp_path, capsys):
    experiment = tmp_path / "digits-small_cnn"
    experiment.mkdir()
    (experiment / "rwp-seed0").write_text("a file where the rwp run's folder goes")
    err = _fails_before_training(tmp_path, capsys, "--optimizer", "sgd", "rwp", "--epochs", "1")
    assert f"cannot write in {experiment / 'rwp-seed0'}: " in err
    assert not (experiment / "sgd-seed0" / "log.jsonl").exists(), "the sgd run before it did not train"


def test_a_read_only_output_folder_fails_before_training(tmp_path, capsys):
    out_dir = Path("/sys/rwp-kernels-runs")  # sysfs: not even root creates folders there
    try:
        out_dir.mkdir()
    except OSError:
        pass
    else:
        out_dir.rmdir()
        pytest.skip("/sys is writable here")
    err = _fails_before_training(out_dir, capsys, "--epochs", "1")
    assert f"cannot write in {out_dir / 'digits-small_cnn'}" in err


def test_plot_without_matplotlib_fails_before_training(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    assert "--plot needs matplotlib" in _fails_before_training(tmp_path, capsys, "--epochs", "1", "--plot")


@pytest.mark.slow
def test_console_script_is_the_same_command(tmp_path):
    script = Path(sys.executable).with_name("rwp-train")
    assert script.exists(), f"pip install puts the rwp-train script next to {sys.executable}"
    out = subprocess.run([str(script), "--out-dir", str(tmp_path / "out"), "--model", "nope"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown model 'nope'" in out.stderr
