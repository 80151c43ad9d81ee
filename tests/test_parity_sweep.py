"""A sample of ``python -m parity.sweep`` (the full sweep is hours of CPU, run by hand; docs/parity.md has its table).

The correct implementation passes at the batch sizes where BatchNorm is
worst conditioned (1 and 2, every mode), and the planted bugs the fp32
rule must catch by the narrowest margins fail, on seeds other than the
tests' default (every bug of ``parity.sweep.BUGS`` is planted in the test it
names).
"""

import pytest

from parity import sweep

@pytest.mark.slow
@pytest.mark.parametrize("seed", [5])
@pytest.mark.parametrize("batch", [1, 2])
def test_no_false_fail_at_small_batches(seed, batch):
    row = sweep.run_one("resnet18", seed, batch, 64, ("eval", "train", "grad", "steps"))
    assert row["passed"], row


@pytest.mark.slow
def test_steps_tolerance_does_not_depend_on_the_modes_before():
    """The sweep's first false FAIL (resnet10t, seed 1, batch 1): ``steps`` at 1044x its tolerance after the other modes.

    The noise runs drew from one generator across modes, and the steps did not
    follow the reference's ReLU kinks, so one realization flipped a kink and
    the next did not. Now each mode draws its own noise and every SGD step's
    forward is kink-matched: the same point gets the same tolerance alone and
    after the other modes, and passes.
    """
    import numpy as np

    from flax_resnet.config import ModelConfig
    from parity import fixtures, harness

    config = ModelConfig("resnet10t")
    model, x = fixtures.calibrated(config, seed=1), fixtures.images(1, 3, 64, 64, seed=2).numpy()
    every = harness.run_parity(model, x, modes=("eval", "train", "grad", "steps"), config=config)
    alone = harness.run_parity(model, x, modes=("steps",), config=config)
    assert every.passed and alone.passed, (every.format(), alone.format())
    steps = lambda r: {p.name: (p.rel, p.tol) for p in r.points if p.mode == "steps"}  # noqa: E731
    assert steps(every).keys() == steps(alone).keys()
    for name, (rel, tol) in steps(alone).items():
        np.testing.assert_allclose(steps(every)[name], (rel, tol), rtol=1e-6, err_msg=name)


@pytest.mark.slow
def test_steps_follow_flax_max_pool_choices():
    """The sweep's false FAIL at resnet18, seed 5, batch 4: the stem conv's weight after two SGD steps at 109x its tolerance.

    In the second step one stem max-pool window whose two largest inputs lie
    within rounding took another element in Flax fp32 than in float64, so the
    stem conv's gradient went elsewhere there; the float64 reference now
    takes Flax's choice (``parity.torch_side._kinks_like``), counted in ``kinks``.
    """
    from flax_resnet.config import ModelConfig
    from parity import fixtures, harness

    config = ModelConfig("resnet18")
    model, x = fixtures.calibrated(config, seed=5), fixtures.images(4, 3, 64, 64, seed=6).numpy()
    r = harness.run_parity(model, x, modes=("steps",), config=config)
    assert r.passed and r.kinks >= 1, r.format()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [13, 14])
def test_second_step_kinks_beyond_first_step_rounding_are_matched(seed):
    """The grouped kind's sweep with a 1e-4 ``KINK_BAND`` (resnext50_32x4d, batch 2): seed 13 at 0.97 of its tolerance, seed 14 a false FAIL at 2.34x.

    The second SGD step starts from parameters carrying the first step's fp32
    gradient noise (1e-2 of the update where train-mode BatchNorm sees 8
    values per channel). At seed 13 three layer4.2 ReLU inputs 1.1-1.7e-4 of
    max|x| from zero fell on the other side: outside the band, they moved
    Flax's layer1 update by 1.9e-2, and the noise runs' own flips made a
    tolerance just as wide. Matched (band 1e-3), the steps are at 0.25
    (seed 13) and 0.40 (seed 14) of their tolerances.
    """
    row = sweep.run_one("resnext50_32x4d", seed, 2, 64, ("steps",))
    assert row["passed"] and row["margin"] < 0.75, row


# The bugs whose margin depends on the fp32 noise rule (a 1% gradient or update error: 80x-2,000x
# in the sweep); the structural ones fail by 1e4x and more, each planted in the test BUGS names.
RULE_BUGS = ["1% fc.bias gradient", "1% BN bias gradient (layer3)", "one SGD update 1% too large"]


@pytest.mark.slow
@pytest.mark.parametrize("bug", RULE_BUGS)
def test_planted_bugs_fail_on_another_seed(bug):
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
