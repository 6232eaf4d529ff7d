"""Fixtures shared by the trainer tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.build import build

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster, and fair to a shared CPU. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def agent_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 planner episodes of the demo environment, built with the demo's spec."""
    tmp = tmp_path_factory.mktemp("agent_store")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_agent_data.py"), "--out", str(tmp / "raw"),
         "--planner", "80", "--noisy", "0", "--per-file", "80"],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    text = (ROOT / "data_specs" / "agent-demo.yaml").read_text()
    text = text.replace(
        "data/raw/agent/planner-*.jsonl", str(tmp / "raw" / "agent" / "planner-*.jsonl")
    )
    text = text.replace("vocab_size: 512", "vocab_size: 320")
    spec = tmp / "agent.yaml"
    spec.write_text(text)
    return build(spec, tmp / "stores").path
