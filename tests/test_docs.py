"""What the README points at is in a clone: linked documents, the sample images in its examples."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_given_the_readme_then_every_linked_file_and_sample_image_is_in_the_repository() -> None:
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", text)
    samples = re.findall(r"(docs/samples/[\w.-]+)", text)
    assert "docs/DESIGN.md" in links and samples, "the README links the design and uses the samples"
    for path in [*links, *samples]:
        if path.startswith("http"):
            continue
        assert (ROOT / path).exists(), f"README points at {path}, which a clone does not have"
    assert not re.search(r"@part\.jpg|\.\./shared", text)
