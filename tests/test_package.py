"""Packaging: the import roots, the version, and a setup.py that works without torch installed."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rwp_kernels

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


def test_setup_py_does_not_need_torch():
    blocker = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
    run = "import runpy; runpy.run_path('setup.py', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", blocker + run], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == rwp_kernels.__version__


@pytest.mark.slow
def test_demo_runs_and_matches_the_textbook_update(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rwp_kernels.demo", "--batch", "4"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ResNet-18 (CIFAR): 62 tensors, 11.17M parameters" in out.stdout
    error = float(re.search(r"textbook update: ([0-9.e+-]+)", out.stdout).group(1))
    assert error < 1e-5
