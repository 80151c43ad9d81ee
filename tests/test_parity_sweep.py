"""A sample of ``python -m parity.sweep`` (the full sweep is hours of CPU, run by hand; docs/parity.md has its table).

The correct implementation passes at the batch sizes where BatchNorm is
worst conditioned (1 and 2, every mode), and every planted bug of
``parity.sweep.BUGS`` fails, on seeds other than the tests' default.
"""

import pytest

from parity import sweep

@pytest.mark.slow
@pytest.mark.parametrize("seed", [5, 11])
@pytest.mark.parametrize("batch", [1, 2])
def test_no_false_fail_at_small_batches(seed, batch):
    row = sweep.run_one("resnet18", seed, batch, 64, ("eval", "train", "grad", "steps"))
    assert row["passed"], row


@pytest.mark.slow
@pytest.mark.parametrize("bug", sweep.BUGS)
def test_every_planted_bug_fails(bug):
    kind, modes, plant, changes, _ = sweep.BUGS[bug]
    row = sweep.run_one(sweep.KINDS[kind], 7, 4, 64, modes, plant, changes)
    assert not row["passed"], row


def test_tables_count_false_fails_and_caught_bugs():
    rows = [
        {"arch": "resnet18", "seed": 0, "batch": 2, "passed": True, "margin": 0.4, "worst": "grad layer1 (grad:x)"},
        {"arch": "resnet18", "seed": 1, "batch": 2, "passed": False, "margin": 1.2, "worst": "grad layer2 (grad:y)"},
        {"bug": "1% fc.bias gradient", "arch": "resnet18", "seed": 0, "batch": 4, "passed": False, "margin": 40.0, "worst": "grad fc"},
    ]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in sweep.tables(rows).splitlines() if line.startswith("| resnet18") or line.startswith("| 1%")]
    assert cells[0] == ["resnet18", "2", "2", "1", "1.20 (grad layer2 (grad:y), seed 1)"]
    assert cells[1][:5] == ["1% fc.bias gradient", "resnet18", "1", "1", "40.0"]
