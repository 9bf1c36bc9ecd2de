"""Every example runs end to end in its short mode (--steps) and exits 0."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

CASES = [
    pytest.param("example_usage.py", ["--steps", "2"], "every check passed", id="example_usage"),
    pytest.param("small_gpt.py", ["--steps", "3", "--d-model", "32", "--block-size", "32", "--batch-size", "4",
                                     "--sample-tokens", "8"],
                 "largest |loss difference|", id="small_gpt"),
    pytest.param("vit.py", ["--steps", "3", "--batch-size", "16"], "test accuracy", id="vit"),
    pytest.param("translation.py", ["--steps", "3", "--batch-size", "16"], "exact match", id="translation"),
    pytest.param("efficient_attention_gpt.py", ["--steps", "3", "--d-model", "32", "--block-size", "32",
                                                "--batch-size", "4", "--sample-tokens", "8"],
                 "recurrent decoding matches the full forward pass: True", id="efficient_attention_gpt"),
    pytest.param("paged_generation.py", ["--steps", "8"], "paged generation matches the full forward pass: True",
                 id="paged_generation"),
]


@pytest.mark.parametrize("script, args, expected", CASES)
def test_example_runs(script, args, expected):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # examples run as a user runs them
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert expected in result.stdout
