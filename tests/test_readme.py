"""The README's code is the project's: its own-model snippet is the marked regions of
``examples/own_model.py`` (which ``tests/test_train.py`` runs), and it starts with the two
commands."""

import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_snippet_is_the_example_that_runs() -> None:
    example = (ROOT / "examples" / "own_model.py").read_text()
    regions = re.findall(r"# --- README[^\n]*\n(.*?)\n\s*# ---\n", example, re.S)
    assert len(regions) == 2, regions
    readme = (ROOT / "README.md").read_text()
    for region in regions:
        assert textwrap.dedent(region) in readme, textwrap.dedent(region)


def test_readme_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1:lines.index("```")]
    assert [line.split("#")[0].strip() for line in block] == ["make demo", "make test"]
    assert lines.index("```bash") <= 2
    assert len(lines) <= 210  # a user's page; the notes are in docs/
