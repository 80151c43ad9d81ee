"""flax_resnet.io: stacked (scan_blocks) variables in every format; convert's summary counts the output."""

from __future__ import annotations

import numpy as np
import pytest

from flax_resnet import TORCHVISION_PARAM_COUNTS, cli
from flax_resnet import io as ckio
from flax_resnet.convert import ModelConfig, stack_blocks, torch_to_flax
from flax_resnet.io.common import flat

from test_hostile import random_state_dict  # noqa: E402


@pytest.mark.parametrize("name", ["v.msgpack", "v.safetensors", "v.npz", "v.pth", "orbax_dir"])
def test_stacked_variables_in_every_format(tmp_path, name):
    if name.endswith(".pth"):
        pytest.importorskip("torch")
    sd = random_state_dict("resnet18", num_classes=5, seed=1)
    unrolled = torch_to_flax(sd)
    stacked = torch_to_flax(sd, scan_blocks=True)
    path = tmp_path / name
    ckio.save(path, stacked)
    model, v = ckio.load(path, scan_blocks=True)
    assert model.scan_blocks and model.arch == "resnet18" and model.num_classes == 5
    got, want = flat(v), flat(stacked)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    _, v = ckio.load(path)  # the unrolled tree by default
    got, want = flat(v), flat(unrolled)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_orbax_directory_holding_a_stacked_tree_loads(tmp_path):
    """A scan_blocks training run's Orbax checkpoint (written by Orbax itself) reads like any other."""
    import orbax.checkpoint as ocp

    sd = random_state_dict("resnet18", num_classes=5, seed=2)
    stacked = stack_blocks(torch_to_flax(sd))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((tmp_path / "run").absolute(), stacked)
    model, v = ckio.load(tmp_path / "run")
    np.testing.assert_array_equal(v["params"]["layer2"]["1"]["conv1"]["kernel"], stacked["params"]["layer2"]["rest"]["conv1"]["kernel"][0])


def test_convert_summary_counts_the_output(capsys, tmp_path):
    """seed -> torchvision folds the conv biases: the summary reports the written file's 25,557,032 parameters."""
    seed = tmp_path / "seed.safetensors"
    ckio.save(seed, random_state_dict("resnet50", layout="seed", num_classes=1000, seed=3))
    rc = cli.main(["convert", str(seed), str(tmp_path / "out" / "tv.safetensors"), "--layout", "torchvision"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"parameters    {TORCHVISION_PARAM_COUNTS['resnet50']:,} (float32)" in out, out
    assert ckio.inspect(tmp_path / "out" / "tv.safetensors")["num_params"] == TORCHVISION_PARAM_COUNTS["resnet50"] == 25_557_032
    r = ckio.convert(seed, tmp_path / "seed.msgpack")
    assert r["num_params"] == 25_583_592  # the seed layout keeps its conv biases
    assert ModelConfig("resnet50", "seed", 1000, 3).conv_bias


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_help_is_plain_with_choices_and_defaults(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # as if unwrapped: argparse wraps to the terminal's width
    assert e.value.code == 0
    assert "`" not in out and "``" not in out
    assert "--json print the report as JSON" in out  # a flag: off unless given, no default shown
    if command == "convert":
        assert "{source,torchvision,seed,transformers,flax}" in out and "(default: source)" in out
        assert "{keep,float32,bfloat16}" in out and "(default: keep)" in out
        assert "(default: auto)" in out and "resnext50_32x4d" in out
        assert "missing parent directories are created" in out
