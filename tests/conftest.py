import functools
import os
import re
import sys

import numpy as np
import pytest

# The parity tests compare against float64 torch runs; JAX's x64 mode is
# switched on per computation (jax.enable_x64), never globally.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Under pytest-xdist each worker gets its share of the cores for torch's OpenMP pool (and the CLI
# processes it starts): two workers on 2 cores, each spinning 2 OpenMP threads beside XLA's, ran the
# parity tests 1.6x slower than one thread each (measured alternately, warm XLA cache). Set before
# torch is imported. The harness then skips its "one_thread" fp32 variant (a repeat of the default
# run); on 2 cores it had equalled the 2-thread default bit for bit anyway.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
# One XLA compilation cache for the run's workers and the CLI processes tests start: many tests
# compile the same programs (resnet18 at 64x64 in every mode), and a cached one loads in a fraction of
# the compile time. The programs and their numbers are the same either way.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# No comparison treats NaN as equal: assert_allclose defaults to equal_nan=True, which lets a
# NaN in Flax's output match a NaN in the reference (or in Flax's own second run).
np.testing.assert_allclose = functools.partial(np.testing.assert_allclose, equal_nan=False)

# The slow tier: deep, wide and full-size runs (`pytest -m slow`; CI and `./quickstart.sh test` run both
# tiers, a plain `pytest` only the fast one). New tests mark themselves with @pytest.mark.slow; these
# are the older tests placed here by node id, so that every pattern must still name a test (below).
SLOW = (
    # full-depth bottleneck parity at 64x64 and 224x224; the fast tier keeps resnet18, resnet10t, resnet26d,
    # resnext50's float64 structure and the transformers resnet-18 row
    "tests/test_parity.py::test_depths_eval_train_grad[*]",
    "tests/test_parity.py::test_other_architectures[resnet34-*]",
    "tests/test_parity.py::test_other_architectures[wide_*]",
    "tests/test_parity.py::test_other_architectures[resnext101*]",
    "tests/test_parity.py::test_other_architectures[resnext50_32x4d-float32]",
    "tests/test_parity.py::test_resnet50_224[*]",
    "tests/test_parity.py::test_batch_1_odd_size_one_channel_ten_classes[resnet101-*]",
    "tests/test_parity.py::test_batch_1_odd_size_one_channel_ten_classes[resnet152-*]",
    "tests/test_parity.py::test_batch_1_odd_size_one_channel_ten_classes[resnet50-*-float32]",
    "tests/test_parity.py::test_features_match_torch_intermediates[resnext50_32x4d]",
    "tests/test_reference.py::test_torch_ref_matches_library[*10?*]",
    "tests/test_reference.py::test_torch_ref_matches_library[*15?*]",
    "tests/test_reference.py::test_torch_ref_matches_library[resnet200*]",
    "tests/test_reference.py::test_flax_matches_library[resnext50_32x4d]",
    "tests/test_nnx_torch.py::test_nnx_matches_torch_float64[resnet50-*]",
    "tests/test_nnx_torch.py::test_nnx_matches_torch_float64[resnet101-*]",
    "tests/test_transformers.py::test_parity_against_transformers_float64[resnet-50]",
    "tests/test_transformers.py::test_round_trip_is_bit_exact_and_loads_strict[resnet-50]",
    "tests/test_variants.py::test_resnet50d_64x64_float64",
    "tests/test_scan.py::test_scanned_model_matches_unrolled",
    "tests/test_scan.py::test_*[resnet50]",
    "tests/test_nnx.py::test_train_command_api_nnx",
    "tests/test_nnx.py::test_scanned_and_rematerialized_step_equals_linen",
    "tests/test_training_cli.py::test_cli_run_resume_fallback_and_changed_settings",
    "tests/test_training_multidevice.py::test_cli_trains_digits_on_4_devices_in_bfloat16",
    "tests/test_training_multidevice.py::test_two_processes_with_jax_distributed_equal_one_device",
    "tests/test_readme.py::test_readme_block_runs_as_written[training-*]",
    "tests/test_readme.py::test_readme_block_runs_as_written[nnx-*]",
    "tests/test_readme.py::test_readme_block_runs_as_written[fine-tune-*]",
    # the fast tier keeps one run per kind and rule: resnet18 fp32 (Linen) and float64 (NNX), resnet10t for
    # the timm stems, resnetrs50 for SE and avg-down, transformers' v1 row; groups by test_model and test_ways_in
    "tests/test_se_resnets.py::test_seresnext26d_parity_at_odd_size[*]",
    "tests/test_nnx_torch.py::test_parity_command_api_nnx_float32",
    "tests/test_nnx_torch.py::test_nnx_matches_torch_float64[resnext50_32x4d-*]",
    "tests/test_training_multidevice.py::test_sharded_step_over_4_devices_equals_single_device",
    "tests/test_reference.py::test_flax_matches_library[seresnext26d_32x4d]",
    "tests/test_reference.py::test_flax_matches_library[resnet10t]",
    "tests/test_reference.py::test_torch_ref_matches_library[wide_*]",
    "tests/test_torch_ref.py::test_seed_state_dict_loads_strictly_and_gives_bit_identical_outputs[resnet101-*]",
    "tests/test_parity_settings.py::test_zero_init_residual_in_both_front_ends_and_torch[nnx]",
    "tests/test_variants.py::test_variant_parity_at_odd_size[resnet26d-*]",
    "tests/test_parity.py::test_fp32_step_rule_catches_one_wrong_sgd_update",
    "tests/test_parity.py::test_fp32_gradient_rule_catches_a_batchnorm_backward_bug",
    "tests/test_parity.py::test_bfloat16_within_twice_torch_autocast",
    "tests/test_parity.py::test_one_channel_ten_classes[float32]",
    "tests/test_parity.py::test_v1_stride_in_1x1[float32]",
    "tests/test_transformers.py::test_parity_against_transformers_float32[*]",
    "tests/test_transformers.py::test_parity_against_transformers_float64[resnet-18]",
    "tests/test_parity_cli.py::test_every_source_by_weights[seed.pth]",
    "tests/test_parity_cli.py::test_every_source_by_weights[transformers]",
    "tests/test_parity_cli.py::test_every_source_by_weights[timm.pth]",
    "tests/test_parity.py::test_other_architectures[resnext50_32x4d-float64]",
    "tests/test_parity.py::test_other_architectures[resnet18-float64]",
    "tests/test_parity_settings.py::test_zero_init_residual_in_both_front_ends_and_torch[linen]",
    "tests/test_kernels.py::test_cpu_kernels_match_plain_gradients_in_float64",
    "tests/test_reference.py::test_flax_matches_library[resnet18]",
    "tests/test_variants.py::test_variant_parity_at_odd_size[resnet18d-*]",
    "tests/test_examples.py::test_example_runs_as_written[parity_checkpoint]",
    "tests/test_backbones.py::test_feature_maps_match_timm[seresnext26d_32x4d]",
    "tests/test_nnx.py::test_masked_optimizers_equal_linen_and_bridge[no-bn-bias-decay]",
    "tests/test_parity.py::test_v1_stride_in_1x1[float64]",
    "tests/test_parity.py::test_one_channel_ten_classes[float64]",
    "tests/test_parity.py::test_python_m_parity_with_weights_file",
    "tests/test_variants.py::test_variant_parity_at_odd_size[resnet10t-float64]",
    "tests/test_parity_cli.py::test_every_source_by_weights[orbax]",
    "tests/test_parity_cli.py::test_every_row_kind_by_arch[resnet10t-*]",
    "tests/test_training.py::test_train_step_fn_under_a_callers_jit_is_train_step",
    "tests/test_training.py::test_bfloat16_step_keeps_float32_params_and_stats",
    "tests/test_model.py::test_dtypes",
    "tests/test_nnx_torch.py::test_nnx_matches_torch_float64[resnet18-*]",
)


def _glob(pattern: str) -> re.Pattern:
    """A node-id pattern: ``*`` and ``?`` are wildcards, brackets are literal (parametrize ids)."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern))


_SLOW = {p: _glob(p) for p in SLOW}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    used = set()
    for item in items:
        for pattern, rx in _SLOW.items():
            if rx.fullmatch(item.nodeid):
                item.add_marker(pytest.mark.slow)
                used.add(pattern)
    # A renamed test must not drop out of its tier silently; only checked when whole files were collected.
    collected = {item.nodeid.split("::")[0] for item in items}
    whole_files = not (config.option.keyword or config.option.deselect or any("::" in a for a in config.args))
    stale = [p for p in SLOW if p.split("::")[0] in collected and p not in used]
    if stale and whole_files:
        raise pytest.UsageError(f"tests/conftest.py SLOW names no collected test: {stale}")


# PARITY_MARGINS=FILE: every run_parity of a test appends its worst point (rel err / tolerance) to FILE,
# the measured margins docs/parity.md records.
if os.environ.get("PARITY_MARGINS"):
    import json

    from parity import harness

    _run_parity = harness.run_parity

    def _logged_run_parity(*args, **kwargs):
        r = _run_parity(*args, **kwargs)
        worst = max(r.points, key=lambda p: p.margin)
        row = {"test": os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0], "arch": r.arch, "dtype": r.dtype, "api": r.api, "batch": r.batch}
        row |= {"passed": r.passed, "worst": worst.label, "rel": worst.rel, "tol": worst.tol, "ratio": worst.margin}
        with open(os.environ["PARITY_MARGINS"], "a") as f:
            f.write(json.dumps(row) + "\n")
        return r

    harness.run_parity = _logged_run_parity
