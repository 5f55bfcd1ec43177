"""The README's ember.ops example runs as written (on the GPU, where its tensors live)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.cuda
def test_ops_example_runs():
    ops_example = next(b for b in python_blocks() if "ember.ops.flash_attn_func" in b)
    exec(compile(ops_example, "README.md", "exec"), {})
