"""Every experiment config in examples/ loads through the CLI's own config reader and validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coreselect.experiment import ExperimentArgs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples").glob("*.yaml"))


def test_the_issue_15_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"table1-cpu.yaml", "gpu-experiment.yaml", "p2d-falsification.yaml", "trim-investigation.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_validates(path: Path) -> None:
    args = ExperimentArgs(**yaml.safe_load(path.read_text(encoding="utf-8")))
    args.validate()
    assert args.out.startswith("runs/")
    for variant in args.variants:  # every variant is a row of the table
        assert variant in args.methods
