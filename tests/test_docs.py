"""The Python snippets of the guide, the coming-from-sbi, embeddings and sequential pages run as written, in order.

Each page's ``python`` blocks share one namespace, like a notebook; a block whose first line is a
file name comment (``# mymodel.py``) is written to that file instead, as the page tells the reader.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def blocks(page: str) -> list[str]:
    return BLOCK.findall((DOCS / page).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("page", ["guide.md", "coming-from-sbi.md", "embeddings.md", "sequential.md"])
def test_snippets_run_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": f"docs_{page.split('.')[0]}"}
    found = blocks(page)
    assert found, page
    for number, code in enumerate(found, 1):
        first = code.splitlines()[0].strip()
        if re.fullmatch(r"# \w+\.py", first):
            Path(first[2:]).write_text(code)
            continue
        try:
            exec(compile(code, f"{page} block {number}", "exec"), namespace)  # noqa: S102 - the docs' own code
        except Exception as error:  # noqa: BLE001 - name the block that failed
            raise AssertionError(f"{page}, Python block {number} failed: {type(error).__name__}: {error}") from error
    plt.close("all")
    for module in [name for name in sys.modules if name == "mymodel"]:
        del sys.modules[module]
