"""bench/nki_cost.py: the simulator-based cost table runs on CPU and writes its markdown."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ml_dtypes")  # the simulator's bf16/fp8 NumPy types

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_cost_table_quick(tmp_path):
    out = tmp_path / "nki_cost.md"
    # As users run it: a module of the repository's bench package.
    subprocess.run([sys.executable, "-m", "bench.nki_cost", "--quick", "--target", "trn1",
                    "--out", str(out)], cwd=REPO_ROOT, check=True, capture_output=True)
    text = out.read_text()
    assert "not measurements" in text and "trn1" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    kernels = {row.split("|")[1].strip() for row in rows[1:]}
    assert {"flash_fwd", "decode (paged)", "matmul", "w8a16_gemm", "fp8_gemm",
            "grouped_gemm"} <= kernels
    for row in rows[1:]:
        assert float(row.split("|")[8]) > 0  # the estimate, in microseconds
