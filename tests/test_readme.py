"""README stays true: its generated tables equal the schema the code validates with."""

from __future__ import annotations

from imgclf import config

from tests.conftest import REPO


def test_readme_tables_are_the_schema():
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- hyperparameters:start -->\n", "<!-- hyperparameters:end -->"
    generated = readme.split(start, 1)[1].split(end, 1)[0].strip()
    assert generated == config.markdown_tables(), "run: python scripts/update_readme.py"


def test_readme_names_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
