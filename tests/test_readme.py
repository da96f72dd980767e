"""The README's Python examples run as written (a block whose first line is `# not run in tests` is skipped)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if code.startswith("# not run in tests"):
        pytest.skip("example marked as not run in tests")
    monkeypatch.chdir(tmp_path)  # examples that save files write here
    exec(compile(code, f"README.md example {index}", "exec"), {"__name__": "__readme__"})
