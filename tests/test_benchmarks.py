"""Smoke runs of the benchmark scripts with small settings: they run to the end and write every row the
README's tables are made of. Nothing here asserts a time. And the scripts' imports: the package only."""
import ast
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_backend

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_scripts_import_no_script_and_no_training_internals(script):
    """Shared code lives in the package (rwp_kernels.official: the official loop; rwp_kernels._bench: timing)."""
    imported = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    own = {s.stem for s in SCRIPTS}
    assert not {m for m in imported if m.split(".")[0] in own or m.startswith("rwp_kernels.train")}, imported


def run_script(name: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, str(BENCHMARKS / name), *args, "--threads", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # subprocesses: see README, Tests
def test_bench_step_quick(tmp_path):
    run = run_script("bench_step.py", tmp_path, "--quick")
    rows = read_rows(tmp_path / "bench_step.csv")
    methods = {(r["section"], r["method"]) for r in rows}
    assert {("optimizer", m) for m in ("SGD foreach", "SGD fused", "RWPSGD perturb+step", "official loop")} <= methods
    assert {("training", m) for m in ("SGD", "RWP two half batches", "RWP whole batch twice", "official loop, halves",
                                      "SAM")} <= methods
    assert all(float(r["ms"]) > 0 for r in rows)
    rwp = next(r for r in rows if r["method"] == "RWPSGD perturb+step")
    split = next(r for r in rows if r["method"] == "RWP two half batches")
    assert float(rwp["paired_x_foreach"]) > 0 and float(rwp["paired_x_fused"]) > 0 and float(split["paired_x_sgd"]) > 0
    assert "target resnet18: RWPSGD/SGD foreach" in run.stdout
    assert (tmp_path / "bench_step.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_ops_one_round(tmp_path):
    require_backend("cpu", "cpu")
    run_script("bench_ops.py", tmp_path, "--models", "resnet18", "--repeats", "1", "--rounds", "1", "--backends", "cpu")
    rows = read_rows(tmp_path / "bench_ops.csv")
    ops = {(r["op"], r["backend"]) for r in rows}
    assert {("perturb+step", "official"), ("sgd step (fused)", "torch"), ("copy 20 B/elem (floor)", "torch"),
            ("noise", "torch.normal_")} <= ops
    assert {(op, "cpu") for op in ("perturb+step", "perturb_", "sgd_step_", "restore_ (regenerated)", "noise",
                                   "perturb+step / floor (paired)")} <= ops
    assert all(float(r["median_ms"]) > 0 and r["numel"] == "11173962" for r in rows)
    assert (tmp_path / "bench_ops.png").stat().st_size > 0


def _bench_variants():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_variants_under_test", BENCHMARKS / "bench_variants.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow  # a subprocess that imports torch
def test_bench_variants_compares_the_shipped_variant_and_needs_a_gpu(tmp_path):
    """Each choice's first variant is what ships (tables.RESIDENT_PARTS, the register caps), so the verdict's
    "keep" keeps it; without a GPU the script lists the variants and exits with status 2."""
    pytest.importorskip("triton")
    from rwp_kernels.triton import tables

    bench = _bench_variants()
    for choice in bench.CHOICES:
        shipped, other = choice.variants
        assert shipped.resident_parts in (None, tables.RESIDENT_PARTS), choice
        assert all(tables.kernel_options(*key)["maxnreg"] == cap for key, cap in shipped.caps.items()), choice
        assert (other.resident_parts, other.caps) != (shipped.resident_parts, shipped.caps)
    run = subprocess.run([sys.executable, str(BENCHMARKS / "bench_variants.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 2, run.stdout + run.stderr
    assert all(v.name in run.stdout for choice in bench.CHOICES for v in choice.variants), run.stdout


@pytest.mark.slow  # Triton's interpreter: about 20 s
def test_bench_variants_times_each_variant_in_effect_and_says_which_wins(tmp_path, monkeypatch):
    """The script's GPU path on the CPU (Triton's interpreter, a few small tensors, one of them with rows longer
    than a tile) with a timer that runs the op once and answers by the variant in effect: the rows, the ratios and
    the verdicts follow, the shipped variants are back afterwards."""
    require_backend("triton", "cpu")
    from rwp_kernels.triton import tables

    bench = _bench_variants()
    shapes = [(4, 3, 20, 20), (4,), (3, 1200)]  # most elements in rows longer than a 512-element tile
    monkeypatch.setattr(bench, "model_shapes", lambda model: (shapes, "test"))
    calls = []

    def fake_ms(fn, device):
        fn()
        kept = tables.RESIDENT_PARTS.get(4, 1) > 1
        cap16 = tables.kernel_options("perturb_kernel", 2)["maxnreg"]
        calls.append((kept, cap16))
        return {(True, 48): 1.0, (False, 48): 0.8, (True, 64): 1.25}[(kept, cap16)]

    monkeypatch.setattr(bench, "median_ms", fake_ms)
    assert bench.main(["--device", "cpu", "--models", "small_cnn", "--rounds", "2", "--out", str(tmp_path)]) == 0
    assert len(calls) == 2 * 2 * 2 * 2  # choices x variants x ops x rounds
    assert tables.RESIDENT_PARTS == {4: 5} and tables.kernel_options("perturb_kernel", 2)["maxnreg"] == 48
    rows = read_rows(tmp_path / "bench_variants_cpu_(Triton_interpreter).csv")
    expected = set()
    for (shipped, other), ratio in zip((c.variants for c in bench.CHOICES), ("0.800", "1.250")):
        expected |= {(shipped.name, op, "1.000") for op in bench.OPS} | {(other.name, op, ratio) for op in bench.OPS}
    assert {(r["variant"], r["op"], r["x_shipped"]) for r in rows} == expected
    text = (tmp_path / "bench_variants_cpu_(Triton_interpreter).md").read_text()
    assert "'no kept rows, 48 registers' is 20.0 % faster (median over the models): set RESIDENT_PARTS = {}" in text
    assert "16-bit perturb_kernel registers: the shipped variant is 25.0 % faster than '64 registers': keep it" in text


GPU_CHECK = BENCHMARKS / "gpu_check.sh"

# A stand-in for the GPU machine's Python: it answers the script's GPU probes as an H200's would and prints what
# each stage asked of it; the self-test fails.
FAKE_PYTHON = """#!/bin/sh
case "$*" in
  *cuda.is_available*) exit 0 ;;
  *get_device_capability*) echo 9.0 ;;
  *--selftest*) echo "selftest ran"; exit 3 ;;
  *) echo "ran: $* (arch list $TORCH_CUDA_ARCH_LIST, extensions in $TORCH_EXTENSIONS_DIR, path $PYTHONPATH)" ;;
esac
"""


def _gpu_check(tmp_path, python: str, stages: str) -> subprocess.CompletedProcess:
    """The script run from ``tmp_path`` (outside the clone), its output folder given relative to it; no GPU visible
    to a real Python, also on a machine with one."""
    env = {"PATH": "/usr/bin:/bin", "PYTHON": python, "GPU_CHECK_STAGES": stages, "HOME": str(tmp_path),
           "CUDA_VISIBLE_DEVICES": ""}
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", str(GPU_CHECK), "out"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # subprocesses that import torch
def test_gpu_check_says_there_is_no_gpu(tmp_path):
    run = _gpu_check(tmp_path, sys.executable, "selftest")
    assert run.returncode == 2 and "no CUDA GPU visible" in run.stderr


def test_gpu_check_runs_every_stage_and_sums_them_up(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    run = _gpu_check(tmp_path, str(fake), "build selftest bench_ops bench_variants")
    assert run.returncode == 1, run.stdout + run.stderr  # a stage failed; the next one still ran
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(" in ")[0] for line in summary] == ["build: exit 0", "selftest: exit 3", "bench_ops: exit 0",
                                                           "bench_variants: exit 0"]
    build = (out / "build.log").read_text()  # for the GPU's architecture only, into an ignored folder of the clone
    assert f"(arch list 9.0, extensions in {BENCHMARKS / 'results' / 'torch_extensions'}, path {BENCHMARKS.parent})" \
        in build  # the checkout on the path: the package need not be installed
    assert "selftest ran" in (out / "selftest.log").read_text()
    assert f"bench_ops.py --device cuda --rounds 2 --out {out}" in (out / "bench_ops.log").read_text()
    assert f"bench_variants.py --out {out}" in (out / "bench_variants.log").read_text()
    bogus = _gpu_check(tmp_path / "again", sys.executable, "build bogus")  # refused before the GPU probe
    assert bogus.returncode == 2 and "unknown stage bogus" in bogus.stderr
