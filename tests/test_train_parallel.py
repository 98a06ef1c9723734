"""The training command with --parallel under torchrun (2 gloo processes on the CPU): the SGD and RWP
runs, rank 0 alone reporting, and a resumed parallel run equal to the uninterrupted one."""
import json
import os
import subprocess
import sys

import pytest
import torch

from rwp_kernels.train.cli import main

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(tmp_path, out_dir, *args):
    # PYTHONFAULTHANDLER: a rank that dies of a signal prints the Python stacks of its threads.
    return subprocess.run([*TORCHRUN, "-m", "rwp_kernels.train", "--parallel", "--no-progress", "--out-dir",
                           str(tmp_path / out_dir), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONFAULTHANDLER="1"))


def failed(run: subprocess.CompletedProcess) -> str:
    return f"exit code {run.returncode}\n--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-6000:]}"


@pytest.mark.slow
def test_parallel_sgd_and_rwp(tmp_path):
    out = torchrun(tmp_path, "out", "--epochs", "2")
    assert out.returncode == 0, failed(out)
    assert out.stdout.count("rwp_kernels.train: digits") == 1, "only rank 0 reports"
    assert "2 processes (1 perturbed)" in out.stdout
    experiment = tmp_path / "out" / "digits-small_cnn-parallel2"
    summary = json.loads((experiment / "summary.json").read_text())
    rows = {r["optimizer"]: r for r in summary["results"]}
    assert set(rows) == {"sgd", "rwp"}
    assert rows["rwp"]["test_acc_mean"] > 0.6, rows  # chance is 0.1
    ckpt = torch.load(experiment / "rwp-seed0" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["world_size"] == 2 and ckpt["epoch"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"]), "the checkpoint holds the plain network"
    records = [json.loads(line) for line in (experiment / "rwp-seed0" / "log.jsonl").read_text().splitlines()]
    # the training totals cover both ranks: 1433 images // 64 per update = 22 updates of 64
    assert [r["epoch"] for r in records] == [1, 2] and records[0]["train_loss"] > 0


@pytest.mark.slow
def test_parallel_resume_matches_the_uninterrupted_run(tmp_path):
    common = ["--optimizer", "rwp", "--epochs", "2"]
    assert (a := torchrun(tmp_path, "a", *common)).returncode == 0, failed(a)
    assert (b := torchrun(tmp_path, "b", *common, "--stop-after", "1")).returncode == 0, failed(b)
    assert (c := torchrun(tmp_path, "b", *common, "--resume")).returncode == 0, failed(c)
    ckpts = [torch.load(tmp_path / d / "digits-small_cnn-parallel2" / "rwp-seed0" / "checkpoint.pt", weights_only=True)
             for d in ("a", "b")]
    assert ckpts[0]["epoch"] == ckpts[1]["epoch"] == 2
    for key, value in ckpts[0]["model"].items():
        assert torch.equal(value, ckpts[1]["model"][key]), key


def test_parallel_batch_must_split_evenly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["--parallel", "--no-progress", "--out-dir", str(tmp_path), "--batch-size", "64"]) == 2
    assert "--batch-size 64 does not split evenly over 3 processes" in capsys.readouterr().err
