"""What every benchmark gets from the command line, and what they share within one run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Options:
    quick: bool
    #: Keep each stack's temporary data dir (logs, Redis AOF, files) after the run.
    keep: bool
    #: Where charts go: ``benchmarks/`` for a recorded run, a temp dir otherwise.
    chart_dir: Path
    #: Attach py-spy to the process under test and save its profile beside the charts.
    profile: bool = False
    #: Figures one benchmark leaves for a later one of the same run (B1's Redis memory for B5).
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def profile_dir(self) -> Path:
        """Where py-spy's raw profiles go: ``benchmarks/out/`` (git-ignored; megabytes each)."""
        return Path(__file__).resolve().parent / "out"

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


#: The model table of B2 and B6: one openai-backend model on the fake upstream.
UPSTREAM_MODEL_CONFIG = """
[models."{model}"]
backend = "openai"
base_url = "{base_url}"
upstream_model = "bench-llm"
max_tokens = 8192
error_on_max_token = true
encoding = "cl100k_base"
timeout_s = 30
max_attempts = 2
"""
