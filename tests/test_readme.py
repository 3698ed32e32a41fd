"""The README's "Python API, for notebooks" block runs as written, so the README cannot drift from the code.

The block is the first fenced ``python`` block after the heading ``## Python API, for notebooks``; it
runs in a fresh interpreter, in an empty folder, with this environment (PYTHONPATH included)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"
HEADING = "## Python API, for notebooks"


def python_api_block(text: str) -> str:
    start = text.index(HEADING) + len(HEADING)
    match = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE).search(text, start)
    if match is None:
        raise AssertionError(f"no ```python block after {HEADING!r} in {README}")
    next_heading = re.compile(r"^#", re.MULTILINE).search(text, start)
    assert next_heading is None or match.start() < next_heading.start(), f"the block must come right after {HEADING!r}"
    return match.group(1)


def test_block_is_found():
    block = python_api_block(README.read_text(encoding="utf-8"))
    assert "load_dataset" in block and "extract_module" in block


def test_python_api_block_runs(tmp_path):
    script = tmp_path / "readme_block.py"
    script.write_text(python_api_block(README.read_text(encoding="utf-8")), encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"README's Python API block failed:\n{result.stdout}\n{result.stderr}"
    assert "module keeps" in result.stdout
