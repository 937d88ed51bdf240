"""The docs' commands run as written: every ``$ `` line of a ``sh`` block (in order, per page,
in one scratch directory) and every ``python`` block."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.glob("*.md"))
BLOCK = re.compile(r"```(sh|python)\n(.*?)```", re.S)
SKIP = ("python3 -m venv",)  # installing is what CI itself does


def _blocks(page: Path) -> list[tuple[str, str]]:
    return [(kind, body) for kind, body in BLOCK.findall(page.read_text())]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_doc_commands_run(page, tmp_path):
    blocks = _blocks(page)
    if not blocks:
        pytest.skip("no runnable blocks")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for kind, body in blocks:
        if kind == "python":
            r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, f"{page.name} python block failed:\n{body}\n{r.stderr[-2000:]}"
            continue
        for line in body.splitlines():
            if not line.startswith("$ ") or line[2:].startswith(SKIP):
                continue
            r = subprocess.run(line[2:], shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, f"{page.name}: {line!r} failed:\n{r.stdout[-1000:]}\n{r.stderr[-2000:]}"
