"""The runnable examples of the docs: a fenced ```python block whose first line is ``# example: <name>``."""
import os
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def example(name: str, doc: str = "integrations.md") -> str:
    """The code of example ``name`` in ``docs/<doc>``, as a user would copy it."""
    text = (DOCS / doc).read_text()
    blocks = re.findall(r"```python\n(# example: ([\w-]+)\n.*?)```", text, flags=re.S)
    found = [code for code, label in blocks if label == name]
    if len(found) != 1:
        raise LookupError(f"docs/{doc} has {len(found)} examples named {name!r}")
    return found[0]


def run_example(name: str, cwd, *, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs example ``name`` of docs/integrations.md as a user would, in a fresh Python in ``cwd``; the test
    fails (with the end of its stderr) unless it exits 0."""
    done = subprocess.run([sys.executable, "-c", example(name)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done
