"""Every ```python snippet of README.md runs as written, standalone (each in a fresh interpreter,
in an empty folder), within SNIPPET_SECONDS, and prints something; a snippet that needs the Hub or
a GPU is marked by an HTML comment on the line before its fence (<!-- no-test: needs the Hub -->)
and is skipped by name, never silently."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPET_SECONDS = 60  # each snippet, on 2 cores shared with other jobs (they take a few seconds alone)
NO_TEST = re.compile(r"<!--\s*no-test:\s*(.+?)\s*-->")


def readme_snippets(text):
    """[(first line number, code, reason to skip or None)] of every ```python fence of `text`."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            prev = lines[i - 1] if i > 0 else ""
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            skip = NO_TEST.search(prev)
            out.append((start + 1, "\n".join(body) + "\n", skip.group(1) if skip else None))
        i += 1
    return out


SNIPPETS = readme_snippets((ROOT / "README.md").read_text())


def test_the_readme_has_snippets_to_run_and_marks_exactly_the_hub_ones():
    assert len([s for s in SNIPPETS if s[2] is None]) >= 3
    skipped = {line: why for line, code, why in SNIPPETS if why}
    assert all("Hub" in why or "GPU" in why for why in skipped.values()), skipped
    for line, code, why in SNIPPETS:  # a snippet naming a Hub repo is marked; the others are not
        assert ("google/" in code) == bool(why), (line, why)


@pytest.mark.parametrize("line, code, why", SNIPPETS, ids=[f"README.md:{s[0]}" for s in SNIPPETS])
def test_readme_snippet_runs_standalone(tmp_path, line, code, why):
    if why:
        pytest.skip(f"README.md:{line}: {why}")
    first = [ln for ln in code.splitlines() if ln.startswith(("import ", "from "))][0]
    assert first.startswith("import minisae"), f"README.md:{line}: import minisae before NumPy, found {first!r}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's minisae, whatever is installed
    try:
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                             timeout=SNIPPET_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md:{line}: still running after {SNIPPET_SECONDS} s")
    assert run.returncode == 0, f"README.md:{line}:\n{run.stderr[-3000:]}"
    assert run.stdout.strip(), f"README.md:{line}: printed nothing"
    if "jumprelu.forward(params, x" in code:  # the training loop by hand: its progress means something
        _assert_learning(run.stdout)


def _assert_learning(out):
    """The first snippet's lines 'step s: loss ..  MSE ..  L0 ..': all three fall five-fold or more,
    L0 to near the 6 planted features per token."""
    rows = [tuple(map(float, m)) for m in re.findall(r"loss ([\d.]+)\s+MSE ([\d.]+)\s+L0 ([\d.]+)", out)]
    assert len(rows) == 6, out
    (loss0, mse0, l00), (loss1, mse1, l01) = rows[0], rows[-1]
    assert loss1 < loss0 / 5 and mse1 < mse0 / 5 and l01 < l00 / 5, out
    assert l01 < 15, out
