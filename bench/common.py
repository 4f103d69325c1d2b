"""What every benchmark shares: importing the repo's packages from a checkout, and the engine flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def add_engine_args(parser: argparse.ArgumentParser, default_model: str) -> None:
    parser.add_argument("--model", default=default_model, help="preset name or model directory")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
