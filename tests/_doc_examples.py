"""The runnable examples of the docs: a fenced ```python block whose first line is ``# example: <name>``."""
import re
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
