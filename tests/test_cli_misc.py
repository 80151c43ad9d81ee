"""The flax-resnet command itself: --version, help texts, missing optional dependencies."""

import argparse
import importlib.metadata
import subprocess
import sys

import pytest

import flax_resnet
from flax_resnet import cli, predict


def test_version_is_the_installed_one(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"flax-resnet {flax_resnet.__version__}\n"
    assert flax_resnet.__version__ == importlib.metadata.version("flax-resnet")
    r = subprocess.run([sys.executable, "-m", "flax_resnet", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"flax-resnet {flax_resnet.__version__}"


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_help_texts_are_plain_and_show_choices_and_defaults():
    top = cli.build_parser().format_help()
    assert "``" not in top and "--version" in top
    for name in ("parity", "convert", "inspect", "train", "predict"):
        assert f"    {name} " in top, f"{name} is not listed in flax-resnet --help"
    p = _subparser("predict")
    text = p.format_help()
    assert "``" not in text and "`" not in text
    assert "{nearest,bilinear,bicubic,lanczos,box,hamming}" in text
    for action in p._actions:
        if action.option_strings and action.nargs != 0 and not action.required:
            assert "default" in action.help, f"predict {action.option_strings[0]}: help shows no default"


def test_missing_dependencies_are_one_line(monkeypatch, capsys, tmp_path):
    def needs(name, message=None):
        def run(args):
            raise ModuleNotFoundError(message or f"No module named '{name}'", name=name)

        return run

    argv = ["predict", str(tmp_path / "x.png"), "--weights", "w"]
    monkeypatch.setattr(predict, "run", needs("torch"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"flax-resnet predict: error: this needs PyTorch: {cli.TORCH_INSTALL} (the CPU wheel the project is tested with)\n"
    assert cli.TORCH_INSTALL == "pip install torch==2.13.0"
    monkeypatch.setattr(predict, "run", needs("PIL", "reading images needs Pillow: pip install 'flax-resnet[predict]'"))
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "flax-resnet predict: error: reading images needs Pillow: pip install 'flax-resnet[predict]'\n"
    monkeypatch.setattr(predict, "run", needs("sklearn"))
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "flax-resnet predict: error: this needs the sklearn module, which is not installed\n"
    monkeypatch.setattr(predict, "run", needs("flax_resnet.nowhere"))  # our own modules missing is a bug: not hidden
    with pytest.raises(ModuleNotFoundError):
        cli.main(argv)


def test_import_flax_resnet_and_the_cli_do_not_import_torch():
    code = "import sys, flax_resnet, flax_resnet.cli, flax_resnet.hub, flax_resnet.predict; flax_resnet.cli.build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_the_cli_parses_its_arguments_without_jax():
    """Why the command modules import JAX-side modules inside the command: ``--help`` and argument errors take no JAX start-up."""
    code = "import sys, flax_resnet.cli; flax_resnet.cli.build_parser(); print(sorted(m for m in ('jax', 'flax', 'torch', 'orbax') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
