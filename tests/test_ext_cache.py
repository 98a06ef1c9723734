"""The extension cache: a folder that cannot be created or written, and a builder killed while it compiles.

Children run with their own TORCH_EXTENSIONS_DIR. The killed-builder test compiles the CPU kernels once.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import requires
from rwp_kernels import _ext_config as C
from rwp_kernels import extension
from _ext_common import CHILD_TIMEOUT, FALLBACK_CHILD, REPO, folder_for, run_child

pytestmark = pytest.mark.slow  # builds, compiles, subprocesses or torchrun: see README, Tests


def file_in_the_way(tmp_path) -> tuple[Path, str]:
    """A cache below a regular file: NotADirectoryError, even for root."""
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file" / "ext", "Not a directory"


def read_only_filesystem(tmp_path) -> tuple[Path, str]:
    """A cache in sysfs, where not even root creates folders."""
    probe = Path("/sys/rwp-kernels-probe")
    try:
        probe.mkdir()
    except OSError:
        return Path("/sys/rwp-kernels-cache"), "Operation not permitted"
    probe.rmdir()
    pytest.skip("/sys is writable here")


UNUSABLE_CACHES = [file_in_the_way, read_only_filesystem]


def cache_env(cache: Path) -> dict:
    return {"TORCH_EXTENSIONS_DIR": str(cache), "RWP_KERNELS_BUILD_CUDA": "0"}


@pytest.mark.parametrize("unusable", UNUSABLE_CACHES)
def test_unusable_cache_gives_the_reference_after_one_warning_naming_the_folder(unusable, tmp_path, monkeypatch):
    cache, error = unusable(tmp_path)
    folder = folder_for(monkeypatch, cache_env(cache))
    out = run_child(FALLBACK_CHILD, cache_env(cache), timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["warnings"]) == 1, result["warnings"]
    warning = result["warnings"][0]
    assert warning.startswith("RuntimeWarning") and "reference" in warning
    assert str(folder) in warning and error in warning
    assert result["same_as_reference"] is True
    assert result["explicit"].startswith("backend 'cpu' is not available")
    assert str(folder) in result["explicit"] and error in result["explicit"]
    assert "compiling" not in out.stderr


def run_module(module: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return run_child(f"""
        import runpy, sys
        sys.argv = [{module!r}, *{list(args)!r}]
        runpy.run_module({module!r}, run_name="__main__")
    """, env)


@pytest.mark.parametrize("unusable", UNUSABLE_CACHES)
def test_build_command_with_an_unusable_cache_fails_in_one_line(unusable, tmp_path, monkeypatch):
    cache, error = unusable(tmp_path)
    folder = folder_for(monkeypatch, cache_env(cache))
    out = run_module("rwp_kernels.build", env=cache_env(cache))
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("rwp_kernels: the extension is unavailable: ")
    assert str(folder) in lines[0] and error in lines[0]


def test_report_with_an_unusable_cache_gives_the_reason_per_backend(tmp_path, monkeypatch):
    cache, error = file_in_the_way(tmp_path)
    folder = folder_for(monkeypatch, cache_env(cache))
    out = run_module("rwp_kernels.report", env=cache_env(cache))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    cpu = next(line for line in out.stdout.splitlines() if line.strip().startswith("backend 'cpu'"))
    assert f"cpu: unavailable (cannot build the extension in {folder}" in cpu and error in cpu
    assert "backend='auto' on cpu  reference" in out.stdout


def test_report_facts_with_an_unreadable_cache(tmp_path, monkeypatch):
    folder = folder_for(monkeypatch, cache_env(tmp_path / "ext"))
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # as for a user without access to the folder (root has it everywhere)
        if str(path).startswith(str(folder)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    facts = extension.facts()
    assert facts["build folder"] == str(folder) and facts["build log"].startswith("none")


def test_training_with_an_unusable_cache_runs_on_the_reference(tmp_path):
    cache, error = file_in_the_way(tmp_path)
    out = run_module("rwp_kernels.train", "--dataset", "digits", "--epochs", "1", "--optimizer", "rwp",
                     "--out-dir", str(tmp_path / "out"), env=cache_env(cache))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "reference backend" in out.stderr and error in out.stderr


# ---- a builder killed while its compiler runs ------------------------------------------------------------

BUILDER = """
    import torch, rwp_kernels
    from rwp_kernels import extension
    ext = extension.load()
    p, ref = [torch.ones(3, 4)], [torch.ones(3, 4)]
    rwp_kernels.perturb_(p, gamma=0.1, seed=1, step=1, backend="cpu")
    rwp_kernels.perturb_(ref, gamma=0.1, seed=1, step=1, backend="reference")
    print(ext.origin, "|", torch.allclose(p[0], ref[0]))
"""


def start_child(code: str, env_overrides: dict, log: Path) -> subprocess.Popen:
    """A child like run_child's, in a session of its own (for the clean-up), not waited for."""
    env = {**os.environ, **env_overrides}
    env.pop("RWP_KERNELS_BUILD_TIMEOUT", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def ninja_running_in(folder: Path) -> int | None:
    """The pid of a ninja process working in ``folder``, if there is one."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "ninja" \
                    and os.readlink(entry / "cwd") == str(folder):
                return int(entry.name)
        except OSError:  # the process ended meanwhile
            continue
    return None


def wait_for_ninja(folder: Path, builder: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and builder.poll() is None:
        pid = ninja_running_in(folder)
        if pid is not None:
            return pid
        time.sleep(0.05)
    pytest.fail(f"no ninja started in {folder} (builder exit status {builder.poll()})")


def links_of(library: Path) -> int:
    """How many times ninja built the library (its .ninja_log has one line per completed step)."""
    lines = (library.parent / ".ninja_log").read_text().splitlines()
    return sum(1 for line in lines if line.split("\t")[3:4] == [library.name])


def test_a_killed_builders_compile_is_waited_for_not_repeated_beside_it(tmp_path, monkeypatch):
    requires(shutil.which(C.cxx_compiler()) is not None, "no C++ compiler", "cpp-ext")
    env = cache_env(tmp_path / "ext")
    folder = folder_for(monkeypatch, env)
    library = extension.library_path(C.make_config())
    first = start_child(BUILDER, env, tmp_path / "first.log")
    try:
        ninja = wait_for_ninja(folder, first)
        first.send_signal(signal.SIGKILL)  # the builder only: its compile goes on as an orphan
        first.wait()
        assert ninja_running_in(folder) == ninja, "the compile ended before the test could start a second builder"
        second = run_child(BUILDER, env, timeout=CHILD_TIMEOUT)
        assert second.returncode == 0, second.stderr
        assert links_of(library) == 1  # two when the second builder compiled beside the first one's ninja
        # (It says it is waiting only after 5 s: a fast machine finishes the orphaned compile sooner.)
        assert second.stdout.strip().endswith("| True"), second.stdout
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # what is left of the first builder's compile, if anything
        except ProcessLookupError:
            pass
