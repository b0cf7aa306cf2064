"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model to load: omit for the embedded SmolLM2-135M-Instruct, 'gemma-3-270m', "
        "or a hub id / local folder",
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
