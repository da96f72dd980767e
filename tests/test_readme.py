"""The README's Python examples run as written (a block whose first line is `# not run in tests` is skipped)."""
import os
import pathlib
import re
import subprocess
import sys

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


def test_seed_is_shown_by_the_readme_test_command():
    """The README says a run prints its seed; its command is `pytest -q`, which hides pytest's header."""
    assert "pytest -q" in README.read_text()
    env = {**os.environ, "POSENC_TEST_SEED": "987654321"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_errors.py",
                             "-k", "odd and head_dim"], cwd=README.parent, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "posenc test seed: 987654321 (replay with POSENC_TEST_SEED=987654321)" in result.stdout, result.stdout
