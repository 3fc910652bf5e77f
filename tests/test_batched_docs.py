"""The code blocks of docs/migration.md run and check what they claim (their assert_close lines)."""
import os
import re

import pytest

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "migration.md")


def _blocks():
    with open(DOC) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_doc_has_checked_examples():
    blocks = _blocks()
    assert len(blocks) == 2 and all("assert_close" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_code_block_runs(index):
    exec(compile(_blocks()[index], f"{DOC}[block {index}]", "exec"), {})
