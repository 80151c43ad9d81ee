"""Model directories, metadata and NNX conversion on hostile input (issue #22): one line naming file and field.

``hub.resolve`` (so ``predict --weights DIR`` and ``from_pretrained``) and
``flax_resnet.load`` read a directory through one reader,
``io.hf_dir.read_config``; every field it uses is checked.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import flax_resnet
from flax_resnet import hub
from flax_resnet import io as ckio
from flax_resnet.io.hf_dir import read_config
from hostile_util import assert_one_line, random_state_dict, run_cli

TIMM = {
    "architecture": "resnet18.a1_in1k",
    "num_classes": 10,
    "label_names": [f"c{i}" for i in range(10)],
    "pretrained_cfg": {"input_size": [3, 32, 32], "crop_pct": 0.875, "interpolation": "bicubic", "crop_mode": "center",
                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
}
TRANSFORMERS = {
    "model_type": "resnet", "layer_type": "basic", "depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512],
    "embedding_size": 64, "num_channels": 3, "downsample_in_bottleneck": False, "id2label": {str(i): f"t{i}" for i in range(10)},
}
PROC = {"crop_pct": 0.875, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": 2,
        "size": {"shortest_edge": 32}}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    sd = random_state_dict()
    ckio.save(d / "timm.safetensors", sd)
    ckio.save(d / "hf.safetensors", sd, layout="transformers")
    return d


def make_dir(root, weights, kind, config=None, proc=None, raw=None):
    d = root / kind
    d.mkdir(exist_ok=True)
    if not (d / "model.safetensors").exists():
        os.link(weights / ("timm.safetensors" if kind == "timm" else "hf.safetensors"), d / "model.safetensors")
    (d / "config.json").write_text(raw if raw is not None else json.dumps(config if config is not None else (TIMM if kind == "timm" else TRANSFORMERS)))
    if kind == "transformers":
        (d / "preprocessor_config.json").write_text(json.dumps(proc if proc is not None else PROC))
    return d


def test_good_directories_resolve_and_load(weights, tmp_path):
    d = make_dir(tmp_path, weights, "timm")
    info = hub.resolve(d)
    assert info.labels == tuple(TIMM["label_names"]) and (info.preprocess.resize, info.preprocess.crop) == (36, 32)
    assert flax_resnet.load(d)[0].num_classes == 10
    d = make_dir(tmp_path, weights, "transformers")
    info = hub.resolve(d)
    assert info.labels[3] == "t3" and (info.preprocess.resize, info.preprocess.crop, info.preprocess.interpolation) == (36, 32, "bilinear")
    assert flax_resnet.load(d)[0].arch == "resnet18"


def test_transformers_height_width_size_is_supported(weights, tmp_path, capsys):
    d = make_dir(tmp_path, weights, "transformers", proc={**PROC, "size": {"height": 40, "width": 48}})
    prep = hub.resolve(d).preprocess
    assert prep.warp == (40, 48) and prep.crop is None and "warp to 40x48 bilinear" in prep.describe()
    from PIL import Image

    from flax_resnet import preprocess as pp

    img = np.random.default_rng(0).integers(0, 256, (30, 70, 3), dtype=np.uint8)
    x = pp.apply(img, prep)
    expected = (np.asarray(Image.fromarray(img).resize((48, 40), Image.BILINEAR), np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
    Image.fromarray(img).save(tmp_path / "a.png")
    rc, out, err = run_cli(capsys, "predict", tmp_path / "a.png", "--weights", d, "--json")
    assert rc == 0, err
    assert json.loads(out)["results"][0]["top"][0]["label"].startswith("t")


TIMM_CASES = {
    "pretrained_cfg_list": ({"pretrained_cfg": [3, 224, 224]}, "pretrained_cfg: expected a JSON object, found list", False),
    "pretrained_cfg_str": ({"pretrained_cfg": "resnet18"}, "pretrained_cfg: expected a JSON object, found str", False),
    "crop_pct_0": ({"pretrained_cfg": {**TIMM["pretrained_cfg"], "crop_pct": 0}}, "pretrained_cfg: crop_pct must be a number in (0, 1], found 0", False),
    "input_size_int": ({"pretrained_cfg": {"input_size": 224}}, "pretrained_cfg: input_size must be [channels, height, width], found 224", False),
    "input_size_inf": ({"pretrained_cfg": {"input_size": [3, float("inf"), float("inf")]}}, "pretrained_cfg: input_size must be an integer", False),
    "interpolation": ({"pretrained_cfg": {"interpolation": 3}}, "pretrained_cfg: interpolation must be one of", False),
    "mean_str": ({"pretrained_cfg": {"mean": "imagenet"}}, "pretrained_cfg: mean must be a list of 3 numbers", False),
    "label_names_int": ({"label_names": 5}, "label_names must be a list of strings, found 5", True),
    "label_names_str": ({"label_names": "abcdefghij"}, "label_names must be a list of strings, found 'abcdefghij'", True),
    "architecture_int": ({"architecture": 18}, "'architecture' must be a string, found 18", True),
    "num_classes_str": ({"num_classes": "10"}, "num_classes must be an integer from 0 to 1,000,000, found '10'", True),
}
TRANSFORMERS_CASES = {
    "id2label_leading_zero": ({"id2label": {**TRANSFORMERS["id2label"], "01": "x"}}, "id2label key '01' is not a class index", True),
    "id2label_space": ({"id2label": {**TRANSFORMERS["id2label"], " 2": "x"}}, "id2label key ' 2' is not a class index", True),
    "id2label_list": ({"id2label": ["a", "b"]}, "id2label must be an object of index -> name, found list", True),
    "id2label_value": ({"id2label": {"0": 1}}, "id2label['0'] must be a string, found 1", True),
    "depths": ({"depths": "2222"}, "depths must be a list of 4 integers", True),
    "hidden_sizes_float": ({"hidden_sizes": [64, 128, 256.5, 512]}, "hidden_sizes must be an integer", True),
    "bottleneck_flag": ({"downsample_in_bottleneck": "yes"}, "downsample_in_bottleneck must be true or false, found 'yes'", True),
    "layer_type": ({"layer_type": None}, "layer_type must be 'basic' or 'bottleneck', found None", True),
}
PROC_CASES = {
    "size_list": ({"size": [224, 224]}, 'size must be {"shortest_edge": N}, {"height": H, "width": W} or N, found [224, 224]'),
    "size_zero": ({"size": {"shortest_edge": 0}}, "size: shortest_edge must be an integer in (0, 8192], found 0"),
    "size_height_only": ({"size": {"height": 224}}, "size must be"),
    "resample": ({"resample": 9}, "resample must be an integer in (-1, 5], found 9"),
    "crop_pct_0": ({"crop_pct": 0}, "crop_pct must be a number in (0, 1], found 0"),
    "std_zero": ({"image_std": [0, 0, 0]}, "image_std must be positive"),
    "normalize_str": ({"do_normalize": "no"}, "do_normalize must be true or false"),
}


@pytest.mark.parametrize("case", list(TIMM_CASES) + [f"tf-{c}" for c in TRANSFORMERS_CASES] + [f"proc-{c}" for c in PROC_CASES])
def test_bad_fields_are_one_line_naming_file_and_field(weights, tmp_path, case):
    if case.startswith("proc-"):
        change, needle = PROC_CASES[case[5:]]
        d = make_dir(tmp_path, weights, "transformers", proc={**PROC, **change})
        where, loads = d / "preprocessor_config.json", False
    elif case.startswith("tf-"):
        change, needle, loads = TRANSFORMERS_CASES[case[3:]]
        d = make_dir(tmp_path, weights, "transformers", {**TRANSFORMERS, **change})
        where = d / "config.json"
    else:
        change, needle, loads = TIMM_CASES[case]
        d = make_dir(tmp_path, weights, "timm", {**TIMM, **change})
        where = d / "config.json"
    with pytest.raises(ValueError) as e:
        hub.resolve(d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(where)) and needle in msg, msg
    if loads:  # fields load() reads too: the same line from the same reader
        with pytest.raises(ValueError) as e2:
            flax_resnet.load(d)
        assert str(e2.value) == msg
    else:
        flax_resnet.load(d)  # load() does not read the preprocessing


def test_predict_and_from_pretrained_say_the_same_line(weights, tmp_path, capsys):
    d = make_dir(tmp_path, weights, "timm", {**TIMM, "pretrained_cfg": {"crop_pct": 0}})
    rc, out, err = run_cli(capsys, "predict", tmp_path / "x.png", "--weights", d)
    assert_one_line(rc, out, err, 2, "x.png: no such image file")  # inputs first
    np.savez(tmp_path / "x.npz", images=np.zeros((1, 8, 8, 3), np.uint8))
    rc, out, err = run_cli(capsys, "predict", tmp_path / "x.npz", "--weights", d)
    assert_one_line(rc, out, err, 2, f"{d / 'config.json'} pretrained_cfg: crop_pct must be a number in (0, 1], found 0")
    with pytest.raises(ValueError, match="crop_pct must be a number"):
        flax_resnet.from_pretrained(d)


@pytest.mark.parametrize("raw", ["[" * 100_000, '{"architecture": "resnet18", "pretrained_cfg": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}",
                                 '{"model_type": "resnet", "id2label": ' + "[" * 40 + "]" * 40 + "}"])
def test_deep_nesting_is_one_line_from_load_and_resolve(weights, tmp_path, capsys, raw):
    d = make_dir(tmp_path, weights, "timm", raw=raw)
    for call in (flax_resnet.load, hub.resolve, read_config):
        with pytest.raises(ValueError, match=r"config.json: JSON nested more than 16 levels deep; refused$"):
            call(d)
    rc, out, err = run_cli(capsys, "inspect", d)
    assert_one_line(rc, out, err, 2, "config.json: JSON nested", command="inspect")


def test_duplicate_keys_and_a_1gb_config_are_refused(weights, tmp_path, capsys):
    d = make_dir(tmp_path, weights, "timm", raw='{"architecture": "resnet18", "architecture": "resnet50"}')
    with pytest.raises(ValueError, match="key 'architecture' appears twice"):
        hub.resolve(d)
    with open(d / "config.json", "wb") as f:  # sparse: 1 GB that takes no disk and is never read
        f.truncate(2**30)
    rc, out, err = run_cli(capsys, "inspect", d)
    assert_one_line(rc, out, err, 2, "config.json: 1,073,741,824 bytes; a JSON config here is at most 67,108,864", command="inspect")
    with pytest.raises(ValueError, match="1,073,741,824 bytes"):
        hub.resolve(d)


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "msgpack"])
@pytest.mark.parametrize("meta,needle", [("[" * 100_000, "JSON nested more than 16 levels deep"), ('{"labels": 5}', "metadata labels must be a list of strings"),
                                         ('{"source": "timm", "arch": "resnet9000"}', "metadata arch 'resnet9000' is not an architecture"),
                                         ('{"stride_in_1x1": "yes"}', "metadata stride_in_1x1 must be true or false"),
                                         ('{"a": 1, "a": 2}', "key 'a' appears twice")])
def test_hostile_metadata_is_one_line(tmp_path, fmt, meta, needle):
    from flax_resnet.io import formats

    sd = random_state_dict()
    path = tmp_path / f"m.{fmt}"
    if fmt == "npz":
        np.savez(path, **sd, **{formats.META_KEY: np.array(meta)})
    elif fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(sd, str(path), metadata={formats.SAFETENSORS_META_KEY: meta})
    else:
        import flax.serialization

        r = ckio.resolve(ckio.read(_save(tmp_path / "v.msgpack", sd)))
        tree = {**jax_numpy(r.variables), formats.META_KEY: meta}
        path.write_bytes(flax.serialization.msgpack_serialize(tree))
    with pytest.raises(ValueError) as e:
        flax_resnet.load(path)
    assert str(e.value).startswith(str(path)) and needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def _save(path, sd):
    ckio.save(path, sd)
    return path


def jax_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


def test_nnx_conversion_applies_the_one_finite_rule():
    from flax_resnet import nnx as fnnx
    from flax_resnet.convert import ConversionError

    sd = random_state_dict()
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = np.nan
    with pytest.raises(ConversionError, match=r"non-finite values in .*layer2.*\(1 NaN, 0 Inf"):
        fnnx.from_torch(sd)
    with pytest.raises(ValueError, match="non-finite values"):
        flax_resnet.from_torch(sd)  # the same rule as the Linen converter
    model = fnnx.from_torch(sd, allow_nonfinite=True)
    variables = fnnx.to_linen(model)
    assert np.isnan(np.asarray(variables["params"]["layer2"]["0"]["conv1"]["kernel"])).sum() == 1
    with pytest.raises(ConversionError, match=r"non-finite values in params/layer2/0/conv1/kernel"):
        fnnx.from_linen("resnet18", variables)
    fnnx.from_linen("resnet18", variables, allow_nonfinite=True)
