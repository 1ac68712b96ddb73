"""The README's GPU-cluster recipe is the shipped example, word for word (so the recipe
people copy from the README is the one the tests load and render)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_shows_the_example_recipe_as_it_is() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Running on GPU clusters", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block == (REPO / "recipes" / "examples" / "slurm-8xh100.yaml").read_text()
