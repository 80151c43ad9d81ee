"""README.md and docs/*.md run as written: every ```python and ```bash/```sh block, each in a fresh directory.

Python blocks run with this interpreter in a subprocess, shell blocks with
``bash -e -o pipefail``, both with this environment's ``bin/`` first on PATH
(``flax-resnet``, ``python``) and the repository on PYTHONPATH. A block that
leaves files behind is run a second time in the same directory: rerunning a
README block over its own output must work too.

HTML comments right before a fence (invisible on GitHub) adapt a block:

* ``<!-- readme-test: skip (why) -->``: not run (setting up a venv, installing);
  the skipped set must stay small and explained.
* ``<!-- readme-test: replace OLD => NEW -->``: CI-sized numbers (epochs,
  architecture, image size); OLD must occur in the block, so the substitution
  cannot silently stop applying.
* ``<!-- readme-test: slow -->``: the block runs in the slow tier (a whole
  parity run, a conversion of full-size weights); the fast tier keeps the rest.
* ``<!-- readme-test: torch-hub-cache FILE (why) -->``: a temporary TORCH_HOME
  whose hub cache holds FILE (random torch_ref weights of FILE's architecture),
  for blocks that would otherwise download torchvision's weights.

Every fence must name its language; ```text is for synopses and output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "bash", "sh", "shell"}
KNOWN = RUN | {"text", "console", "json", "toml", "yaml", "diff"}
DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")
MAX_SKIPPED = 4


def parse(text: str, name: str = "README.md") -> list[dict]:
    """Fenced blocks of a Markdown text: file, line, lang, code and the readme-test directives before them."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(`{3,})\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        directives, j = [], i - 1
        while j >= 0 and DIRECTIVE.match(lines[j]):
            directives.insert(0, DIRECTIVE.match(lines[j]).group("body"))
            j -= 1
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{name}:{start + 1}: unclosed code fence")
        blocks.append({"file": name, "line": start + 1, "lang": lang, "code": "\n".join(body) + "\n", "directives": directives})
        i += 1
    return blocks


def _prepare(block: dict) -> tuple[str, str | None, list[str]]:
    """(code after replacements, skip reason or None, torch hub files to provide)."""
    code, skip, cache = block["code"], None, []
    for d in block["directives"]:
        if d.startswith("skip"):
            skip = d[len("skip") :].strip(" :") or ""
        elif d.startswith("replace "):
            old, sep, new = d[len("replace ") :].partition(" => ")
            assert sep, f"{block.get('file', 'README.md')}:{block['line']}: 'replace OLD => NEW' expected, got {d!r}"
            assert old in code, f"{block.get('file', 'README.md')}:{block['line']}: replace target {old!r} is not in the block"
            code = code.replace(old, new)
        elif d == "slow":
            pass  # a mark (``_param``)
        elif d.startswith("torch-hub-cache "):
            cache.append(d.split()[1])
        else:
            raise AssertionError(f"{block.get('file', 'README.md')}:{block['line']}: unknown readme-test directive {d!r}")
    return code, skip, cache


BLOCKS = [b for doc in DOCS for b in parse(doc.read_text(encoding="utf-8"), str(doc.relative_to(ROOT)))]
RUNNABLE = [b for b in BLOCKS if b["lang"] in RUN]


def test_every_fence_names_a_known_language():
    bad = [f"{b['file']}:{b['line']} ({b['lang'] or 'none'})" for b in BLOCKS if b["lang"] not in KNOWN]
    assert not bad, f"fences without a known language: {bad}; use ```text for synopses"
    assert len(RUNNABLE) >= 8


def test_skipped_blocks_are_few_and_explained():
    skipped = [(b["line"], _prepare(b)[1]) for b in RUNNABLE if _prepare(b)[1] is not None]
    assert len(skipped) <= MAX_SKIPPED, skipped
    assert all(len(why) > 10 and why.startswith("(") for _, why in skipped), skipped


def test_parser_reads_directives_and_fences():
    text = "x\n<!-- readme-test: skip (why not) -->\n<!-- readme-test: replace a => b -->\n```bash\necho a\n```\n\n````python\n```\n````\n"
    (b1, b2) = parse(text)
    assert (b1["line"], b1["lang"], b1["code"], b1["directives"]) == (4, "bash", "echo a\n", ["skip (why not)", "replace a => b"])
    assert (b2["lang"], b2["code"], b2["directives"]) == ("python", "```\n", [])
    assert _prepare(b1) == ("echo b\n", "(why not)", [])
    with pytest.raises(AssertionError, match="is not in the block"):
        _prepare({"line": 1, "code": "x", "directives": ["replace y => z"]})


def _fill_torch_hub(home: Path, files: list[str]) -> None:
    if not files:
        return
    import torch

    import torch_ref
    from flax_resnet import hub

    d = home / "hub" / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    for name in files:
        w = hub.TORCHVISION_WEIGHTS[name.lower()]
        torch.manual_seed(0)
        torch.save(getattr(torch_ref, w.arch)(layout="torchvision").state_dict(), d / name)


def _run(kind: str, script: Path, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(script)] if kind == "python" else ["bash", "-e", "-o", "pipefail", str(script)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _param(block: dict):
    return pytest.param(block, id=f"{Path(block['file']).stem}-L{block['line']}-{block['lang']}", marks=[pytest.mark.slow] if "slow" in block["directives"] else [])


@pytest.mark.parametrize("block", [_param(b) for b in RUNNABLE])
def test_readme_block_runs_as_written(block, tmp_path):
    code, skip, cache = _prepare(block)
    if skip is not None:
        pytest.skip(f"{block['file']}:{block['line']}: {skip}")
    work = tmp_path / "work"
    work.mkdir()
    kind = "python" if block["lang"] == "python" else "bash"
    script = tmp_path / ("block.py" if kind == "python" else "block.sh")
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MPLBACKEND"] = "Agg"
    env["TORCH_HOME"] = str(tmp_path / "torch")  # never the user's caches
    env["HF_HUB_CACHE"] = str(tmp_path / "hf")
    env["HF_HUB_OFFLINE"] = "1"
    # JAX_COMPILATION_CACHE_DIR (conftest): blocks load what other blocks and tests compiled.
    _fill_torch_hub(tmp_path / "torch", cache)
    runs = 0
    while True:
        runs += 1
        r = _run(kind, script, work, env)
        assert r.returncode == 0, f"{block['file']}:{block['line']} ({kind}, run {runs}) exited {r.returncode}\n--- code\n{code}--- stdout\n{r.stdout[-3000:]}--- stderr\n{r.stderr[-3000:]}"
        if runs == 2 or not any(work.iterdir()):
            break


def test_readme_links_every_docs_page_and_stays_short():
    text = README.read_text(encoding="utf-8")
    pages = [p.name for p in DOCS[1:]]
    assert pages, "docs/ holds no pages"
    missing = [name for name in pages if f"(docs/{name})" not in text]
    assert not missing, f"README.md does not link {missing}"
    assert len(text.splitlines()) <= 250, "README.md: keep it short; move detail into docs/"
