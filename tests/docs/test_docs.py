"""Every ```python block of README.md and docs/*.md runs, and prints what it says it prints.

The conventions a page keeps (so that what a reader copies works):

* A page's blocks run in order, in one namespace, after ``torch.manual_seed(0)``: a block may use what an earlier
  block of the same page defined. Pages do not share a namespace.
* A block that cannot run on a CPU machine within CI's time (a GPU, several processes, a compile of tens of
  seconds) opens with the fence ```` ```python no-run ```` and its first line is a comment saying why
  (``# not run: ...``). It is still compiled (a syntax error fails), and it is reported as a skip named by its
  page and line, with that reason.
* Output shown in a block is checked: a top-level ``print(...)`` statement followed by comment lines prints
  exactly those lines (each without its leading ``# ``), and a one-line ``print(...)  # text`` prints ``text``.
  ``...`` in the expected text matches anything within its line. Other comments are not checked.
* Fences other than ``python``, ``python no-run``, ``bash``, ``text`` and none are refused, and so are indented
  fences (in a list item): a block in another spelling (```` ```py ````) or place would silently never run.

Relative links of every page must name files that exist.
"""
import ast
import contextlib
import io
import os
import re
import sys
import traceback

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = ["README.md"] + sorted(f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs"))
                               if name.endswith(".md"))
FENCE = re.compile(r"^```(.*)$")
KNOWN_INFO = {"python", "python no-run", "bash", "text", ""}
NO_RUN = "python no-run"


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def blocks(page):
    """``(info, first line number of the code, code)`` of every fenced block of ``page``, in order."""
    out, info, start, lines = [], None, 0, []
    for number, line in enumerate(read(page).splitlines(), 1):
        assert not re.match(r"\s+```", line), f"{page}:{number}: an indented fence, which this test does not read"
        match = FENCE.match(line)
        if info is None:
            if match:
                info, start, lines = match.group(1).strip(), number + 1, []
        elif match and not match.group(1).strip():
            out.append((info, start, "\n".join(lines) + "\n"))
            info = None
        else:
            lines.append(line)
    assert info is None, f"{page}: the block opened at line {start - 1} is never closed"
    return out


def not_run_blocks():
    return [pytest.param(page, start, code, id=f"{page}:{start}")
            for page in PAGES for info, start, code in blocks(page) if info == NO_RUN]


def expected_output(stmt, lines):
    """What the top-level statement ``stmt`` of a block (its ``lines``) shows as its output, or None."""
    call = stmt.value if isinstance(stmt, ast.Expr) else None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print"):
        return None
    rest = lines[stmt.end_lineno - 1][stmt.end_col_offset:].strip()
    if rest.startswith("#"):
        return [rest[1:].strip()]
    shown = []
    for line in lines[stmt.end_lineno:]:
        text = line.strip()
        if not text.startswith("#"):
            break
        shown.append(text[2:] if text.startswith("# ") else text[1:])
    return shown or None


def check_output(got, shown, where):
    got_lines = [line.rstrip() for line in got.rstrip("\n").split("\n")]
    patterns = [re.escape(line.rstrip()).replace(re.escape("..."), ".*") for line in shown]
    ok = len(got_lines) == len(patterns) and all(re.fullmatch(p, g) for p, g in zip(patterns, got_lines))
    if not ok:
        raise AssertionError(f"{where}: the page shows\n" + "\n".join(shown) + "\nbut it printed\n" + got)


def run_block(code, start, page, namespace):
    """Run ``code`` statement by statement in ``namespace``; tracebacks and messages name the page's lines."""
    tree = ast.parse(code, filename=page)
    ast.increment_lineno(tree, start - 1)
    lines = code.split("\n")
    for stmt in tree.body:
        shown = expected_output(stmt, [""] * (start - 1) + lines)
        compiled = compile(ast.Module(body=[stmt], type_ignores=[]), page, "exec")
        if shown is None:
            exec(compiled, namespace)
            continue
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compiled, namespace)
        check_output(buffer.getvalue(), shown, f"{page}:{stmt.lineno}")


@pytest.fixture
def one_thread():
    """The pages' small problems on one thread: on a machine shared with other jobs, two threads wait for each other
    at every op's barrier. The 100-step training loop of docs/hypernetworks.md, run alone with OMP_NUM_THREADS=2
    and =1 in turn on this project's 2-core CPU machine (load average 6, 2026-11-30): 22.8 s and 8.6 s on two
    threads, 1.24 s and 1.28 s on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("page", PAGES)
def test_page_runs(page, one_thread):
    namespace = {"__name__": f"docs:{page}"}
    torch.manual_seed(0)
    for info, start, code in blocks(page):
        assert info in KNOWN_INFO, f"{page}:{start - 1}: fence ```{info}: use one of {sorted(KNOWN_INFO)}"
        if info == "python":
            run_block(code, start, page, namespace)


@pytest.mark.parametrize("page, start, code", not_run_blocks())
def test_not_run_block(page, start, code):
    """A no-run block compiles and says why it does not run; then it is a skip, named and counted."""
    compile(code, f"{page}:{start}", "exec")
    first = code.lstrip("\n").split("\n", 1)[0].strip()
    assert first.startswith("#") and first.lstrip("# "), \
        f"{page}:{start}: a no-run block opens with a comment that says why it cannot run here"
    pytest.skip(f"{page}:{start}: {first.lstrip('# ')}")


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_exist(page):
    base = os.path.dirname(os.path.join(ROOT, page))
    for target in LINK.findall(read(page)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor of the page itself
        path = os.path.normpath(os.path.join(base, target.split("#", 1)[0]))
        assert os.path.exists(path), f"{page}: the link ({target}) names no file"


# -- the conventions themselves --------------------------------------------------------------------------

def test_output_check_reads_both_forms_and_fails_on_a_difference():
    code = "x = 2\nprint(x + 1)  # 3\nprint('a'); y = 1\nprint('b\\nc')\n# b\n# ...\n"
    run_block(code, 10, "page.md", {})
    with pytest.raises(AssertionError, match=r"page\.md:11: the page shows\n4\nbut it printed\n3"):
        run_block("print(3)  # 4\n", 11, "page.md", {})
    with pytest.raises(AssertionError, match="the page shows"):
        run_block("print('a\\nb')\n# a\n", 1, "page.md", {})  # a missing line
    with pytest.raises(ZeroDivisionError) as info:
        run_block("x = 1\n\nx / 0\n", 20, "page.md", {})
    assert traceback.extract_tb(info.value.__traceback__)[-1][:2] == ("page.md", 22)


def test_blocks_are_read_with_their_line_numbers(tmp_path, monkeypatch):
    (tmp_path / "p.md").write_text("text\n```python\na = 1\n```\n\n```python no-run\n# why\n```\n```bash\nls\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    assert blocks("p.md") == [("python", 3, "a = 1\n"), ("python no-run", 7, "# why\n"), ("bash", 10, "ls\n")]
    (tmp_path / "p.md").write_text("- a list item:\n  ```python\n  a = 1\n  ```\n")
    with pytest.raises(AssertionError, match="p.md:2: an indented fence"):
        blocks("p.md")
    (tmp_path / "p.md").write_text("```python\na = 1\n")
    with pytest.raises(AssertionError, match="the block opened at line 1 is never closed"):
        blocks("p.md")
