"""Packaging: the import roots, the version, and a setup.py that works without torch installed."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rwp_kernels
from rwp_kernels._version import release

ROOT = Path(__file__).resolve().parent.parent


def test_import_roots():
    import rwp_kernels.optim

    assert rwp_kernels.optim.__name__ == "rwp_kernels.optim"
    for name in ("noise", "perturb_", "restore_", "sgd_step_", "philox4x32_10", "available_backends"):
        assert callable(getattr(rwp_kernels, name)), name


@pytest.mark.slow
def test_checkout_resolves_optim_without_the_install_mapping():
    """The clone's root on sys.path (a command run there) and no installer's finder: rwp_kernels.optim still
    imports, from the checkout's python_api/, as after a regular install where the checkout shadows it."""
    code = (
        "import sys; "
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]; "
        f"sys.path.insert(0, {str(ROOT)!r}); "
        "import rwp_kernels, rwp_kernels.optim, rwp_kernels.optim.sgd; "
        "print(rwp_kernels.__file__); print(rwp_kernels.optim.__file__); print(rwp_kernels.optim.RWPSGD.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    package, optim, module = out.stdout.split()
    assert Path(package) == ROOT / "rwp_kernels" / "__init__.py"
    assert Path(optim) == ROOT / "python_api" / "__init__.py"
    assert module == "rwp_kernels.optim.sgd"



@pytest.mark.slow
def test_importing_the_optimizers_does_not_import_dynamo():
    """torch._dynamo takes a second or more to import on a small CPU; a script that never compiles should not
    pay for it (the optimizers mark their methods for dynamo at the first call)."""
    code = "import sys, rwp_kernels.optim; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]

def test_setup_py_does_not_need_torch():
    blocker = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
    run = "import runpy; runpy.run_path('setup.py', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", blocker + run], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == rwp_kernels.__version__


def test_a_python_without_torch_is_told_what_to_install():
    """From the clone's root a Python without PyTorch (not the environment the package went into) imports the
    checkout's rwp_kernels: the error names that Python and the install command, not only the missing module."""
    code = "import sys; sys.modules['torch'] = None; import rwp_kernels.optim, rwp_kernels.train"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: rwp_kernels needs PyTorch"), out.stderr[-2000:]
    assert sys.executable in last and 'pip install ".[train]"' in last


def test_a_checkout_with_its_environment_says_to_activate_it(tmp_path):
    """The same error in a checkout that has the README's .venv (a new shell that has not activated it): the
    message names that environment and the activate command; without one, it does not."""
    (tmp_path / "rwp_kernels").mkdir()
    shutil.copy(ROOT / "rwp_kernels" / "__init__.py", tmp_path / "rwp_kernels")
    code = "import sys; sys.modules['torch'] = None; import rwp_kernels"

    def last_line() -> str:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0
        return out.stderr.strip().splitlines()[-1]

    assert "This checkout has one" not in last_line()
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").touch()
    last = last_line()
    assert last.startswith("ModuleNotFoundError: rwp_kernels needs PyTorch"), last
    assert f". {tmp_path.resolve() / '.venv'}/bin/activate" in last


@pytest.mark.slow
def test_demo_runs_and_matches_the_textbook_update(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rwp_kernels.demo", "--batch", "4"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ResNet-18 (CIFAR): 62 tensors, 11.17M parameters" in out.stdout
    error = float(re.search(r"textbook update: ([0-9.e+-]+)", out.stdout).group(1))
    assert error < 1e-5


def _setup_kwargs() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup, with torch unimportable."""
    code = (
        "import sys, json; sys.modules['torch'] = None; import setuptools; captured = {}; "
        "setuptools.setup = lambda **kw: captured.update(kw); "
        "import runpy; runpy.run_path('setup.py', run_name='__main__'); "
        "print(json.dumps({k: captured[k] for k in ('install_requires', 'extras_require', 'version')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dependency_floors_are_stated_once_and_tested():
    """setup.py's floors come from rwp_kernels/_version.py; the torch floor is the lowest tested torch; the
    Triton floor is a tested Triton; README states both; this torch is not below the floor."""
    from rwp_kernels._version import MIN_TORCH, MIN_TRITON, TESTED

    kw = _setup_kwargs()
    assert f"torch>={MIN_TORCH}" in kw["install_requires"]
    assert kw["extras_require"]["triton"] == [f"triton>={MIN_TRITON}"]
    torches = [release(t) for t, _, _ in TESTED]
    assert min(torches)[: len(release(MIN_TORCH))] == release(MIN_TORCH), "the floor must be a tested torch"
    tritons = [release(tr) for _, tr, _ in TESTED if tr]
    assert min(tritons)[: len(release(MIN_TRITON))] == release(MIN_TRITON), "the floor must be a tested Triton"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"PyTorch {MIN_TORCH} or newer" in readme and f"Triton {MIN_TRITON} or newer" in readme
    for torch_version, triton_version, _ in TESTED:
        assert torch_version in readme and (triton_version is None or triton_version in readme)
    import torch

    assert release(torch.__version__) >= release(MIN_TORCH)
    assert release("3.7.0+git1234") == (3, 7, 0) and release("3.9.0rc1") == (3, 9, 0) and release("2.11") == (2, 11)


def test_report_prints_the_floors_and_the_tested_versions():
    from rwp_kernels._version import MIN_TORCH, MIN_TRITON, TESTED
    from rwp_kernels.report import environment_rows

    rows = dict(environment_rows())
    assert rows["supported"] == f"torch >= {MIN_TORCH}; the Triton backend: triton >= {MIN_TRITON}"
    for torch_version, triton_version, _ in TESTED:
        assert f"torch {torch_version}" in rows["tested with"]
        assert triton_version is None or f"triton {triton_version}" in rows["tested with"]


def test_an_old_triton_leaves_the_triton_backend_unavailable_with_the_reason(monkeypatch):
    from importlib import metadata

    from rwp_kernels import backends

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "3.3.1" if name == "triton" else real(name))
    with pytest.raises(backends.BackendUnavailableError, match=r"triton 3\.3\.1 is installed; .* triton >= 3\.6"):
        backends._require_triton_version()


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.6.0", None, False), ("3.7.0", "2.4.6", False),
    ("3.8.0", "2.5.0", False)])
def test_triton_3_6s_interpreter_refuses_numpy_2_4_with_the_reason(monkeypatch, triton_version, numpy_version,
                                                                    refused):
    from importlib import metadata

    from rwp_kernels import backends

    def version(name):
        if numpy_version is None:  # (no numpy: the interpreter's import says so)
            raise metadata.PackageNotFoundError(name)
        return {"numpy": numpy_version}[name]

    monkeypatch.setattr(metadata, "version", version)
    if refused:
        with pytest.raises(backends.BackendUnavailableError, match=r"Triton 3\.6\.0's interpreter needs numpy < 2\.4"):
            backends._require_interpreter_numpy(triton_version)
    else:
        backends._require_interpreter_numpy(triton_version)
