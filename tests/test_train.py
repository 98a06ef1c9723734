"""The training command: the default run end to end (short), every model and optimizer, bit-exact
resume, and bad input rejected in one line before any work."""
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


@pytest.mark.parametrize("optimizer", ["sgd", "rwp", "arwp", "sam"])
def test_each_optimizer_learns_digits(tmp_path, optimizer):
    code = main(["--optimizer", optimizer, "--epochs", "3", "--out-dir", str(tmp_path), "--no-progress"])
    assert code == 0
    record = read_log(tmp_path / "digits-small_cnn" / f"{optimizer}-seed0" / "log.jsonl")[-1]
    assert record["test_acc"] > 0.6, record  # chance is 0.1


def test_resume_matches_the_uninterrupted_run(tmp_path):
    common = ["--optimizer", "rwp", "--epochs", "3", "--no-progress"]
    assert main(common + ["--out-dir", str(tmp_path / "a")]) == 0
    assert main(common + ["--out-dir", str(tmp_path / "b"), "--stop-after", "1"]) == 0
    assert len(read_log(tmp_path / "b" / "digits-small_cnn" / "rwp-seed0" / "log.jsonl")) == 1
    assert main(common + ["--out-dir", str(tmp_path / "b"), "--resume"]) == 0
    runs = [tmp_path / d / "digits-small_cnn" / "rwp-seed0" for d in ("a", "b")]
    ckpts = [torch.load(r / "checkpoint.pt", weights_only=False) for r in runs]
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


def test_bad_input_exit_status_from_the_command_line(tmp_path):
    out = train(tmp_path, "--model", "nope")
    assert out.returncode == 2 and "unknown model 'nope'" in out.stderr


def test_console_script_is_the_same_command(tmp_path):
    script = Path(sys.executable).with_name("rwp-train")
    assert script.exists(), f"pip install puts the rwp-train script next to {sys.executable}"
    out = subprocess.run([str(script), "--out-dir", str(tmp_path / "out"), "--model", "nope"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown model 'nope'" in out.stderr
