"""The README's Python snippet runs as written, with public names only."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_snippet_runs(capsys):
    text = README.read_text()
    code = re.search(r"<!-- python-api -->\n```python\n(.*?)```", text, re.S).group(1)
    assert re.findall(r"\bmemplan\.(\w+)", code) and all(
        name in __import__("memplan").__all__ for name in re.findall(r"\bmemplan\.(\w+)", code))
    exec(compile(code, "README.md", "exec"), {})
    assert "fits" in capsys.readouterr().out
