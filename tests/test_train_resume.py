"""--resume of the training command: checkpoints load with weights_only=True (a crafted one runs no code),
an unusable checkpoint is one line and exit status 2, other settings than the checkpoint's are refused
before any training, and a missing checkpoint is said, not silently trained over."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from rwp_kernels.train.cli import main

RUN = os.path.join("digits-small_cnn", "sgd-seed0")
FIRST = ["--optimizer", "sgd", "rwp", "--epochs", "2"]  # the settings of the run the slow tests resume


def train(cwd, *args):
    return subprocess.run([sys.executable, "-m", "rwp_kernels.train", "--out-dir", "out", "--no-progress", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rwp_kernels.train: error:"), stderr
    return lines[0]


class RunsACommand:
    """Unpickling this calls os.system: what a crafted checkpoint would do under weights_only=False."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def checkpoint_path(out_dir) -> str:
    path = os.path.join(out_dir, RUN, "checkpoint.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


@pytest.mark.slow
def test_a_crafted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model": RunsACommand(f"touch {marker}")}, checkpoint_path(tmp_path / "out"))
    out = train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--resume")
    assert out.returncode == 2, out.stderr
    line = one_error_line(out.stderr)
    assert RUN in line and "refused" in line and "system" in line, line
    assert not marker.exists(), "loading the checkpoint ran its command"
    assert "epoch" not in out.stdout and not (tmp_path / "out" / "digits-small_cnn" / "summary.json").exists()


def _truncated(path):
    torch.save({"model": {"w": torch.zeros(1000)}, "epoch": 1}, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


@pytest.mark.parametrize("write,reason", [
    (lambda p: open(p, "wb").close(), "not a readable torch.save file"),
    (_truncated, "not a readable torch.save file"),
    (lambda p: open(p, "w").write("not a checkpoint\n"), "not a readable torch.save file"),
    (lambda p: torch.save(torch.zeros(3), p), "holds a Tensor"),
    (lambda p: torch.save({"model": {}, "epoch": 1}, p), "no optimizer, scheduler, scaler, rng, history, config"),
    (lambda p: os.makedirs(p), "cannot write"),
], ids=["empty", "truncated", "text", "tensor", "missing-keys", "directory"])
def test_an_unusable_checkpoint_is_one_line_and_status_2(tmp_path, capsys, write, reason):
    path = checkpoint_path(tmp_path)
    write(path)
    assert main(["--optimizer", "sgd", "--epochs", "1", "--out-dir", str(tmp_path), "--no-progress", "--resume"]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert path in line and reason in line, line
    assert "epoch" not in captured.out, "no training may start"


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """An out-dir with sgd and rwp stopped after epoch 1 of 2."""
    cwd = tmp_path_factory.mktemp("stopped")
    out = train(cwd, *FIRST, "--stop-after", "1")
    assert out.returncode == 0, out.stderr
    return cwd / "out"


def resume_from(stopped_run, tmp_path, *args):
    shutil.copytree(stopped_run, tmp_path / "out")
    return train(tmp_path, *args, "--resume")


def load(tmp_path, run):
    return torch.load(tmp_path / "out" / "digits-small_cnn" / run / "checkpoint.pt", weights_only=True)


@pytest.mark.slow
def test_the_checkpoint_holds_plain_data_and_the_settings(stopped_run):
    ckpt = torch.load(stopped_run / "digits-small_cnn" / "rwp-seed0" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["method_cfg"]["gamma"] == 0.01
    assert ckpt["config"]["settings"]["epochs"] == 2 and ckpt["config"]["settings"]["backend"] == "auto"
    assert "gamma" not in load(stopped_run.parent, "sgd-seed0")["config"]["settings"], "sgd does not use it"


@pytest.mark.slow
def test_resume_refuses_other_settings_before_training(stopped_run, tmp_path):
    out = resume_from(stopped_run, tmp_path, "--optimizer", "sgd", "rwp", "--epochs", "8", "--lr", "0.5", "--gamma",
                      "0.2", "--batch-size", "32")
    assert out.returncode == 2, out.stderr
    line = one_error_line(out.stderr)
    for change in ("--epochs 2 -> 8", "--lr 0.1 -> 0.5", "--gamma 0.01 -> 0.2", "--batch-size 64 -> 32"):
        assert change in line, line
    assert "epoch" not in out.stdout
    for run in ("sgd-seed0", "rwp-seed0"):
        assert load(tmp_path, run)["epoch"] == 1, "nothing trained"
    summary = "digits-small_cnn/summary.json"
    assert (tmp_path / "out" / summary).read_text() == (stopped_run / summary).read_text()


@pytest.mark.slow
def test_resume_may_change_workers_and_output_flags_and_records_what_ran(stopped_run, tmp_path):
    out = resume_from(stopped_run, tmp_path, *FIRST, "--workers", "1", "--stop-after", "2")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "out" / "digits-small_cnn" / "summary.json").read_text())
    assert summary["settings"]["lr"] == 0.1 and summary["settings"]["epochs"] == 2
    for run in ("sgd-seed0", "rwp-seed0"):
        ckpt = load(tmp_path, run)
        assert ckpt["epoch"] == 2 and ckpt["config"]["workers"] == 1
        assert ckpt["config"]["settings"] == {k: summary["settings"][k] for k in ckpt["config"]["settings"]}


@pytest.mark.slow
def test_resume_without_a_checkpoint_says_it_starts_from_scratch(tmp_path):
    out = train(tmp_path, "--optimizer", "sgd", "--epochs", "1", "--resume")
    assert out.returncode == 0, out.stderr
    path = os.path.join("out", RUN, "checkpoint.pt")
    assert f"rwp_kernels.train: --resume: no checkpoint at {path}; starting sgd seed 0 from scratch" in out.stderr
