"""The documentation: the site builds with no broken link (mkdocs --strict), its reference pages are what the code
generates now (every config key, every command's flags), and the README stays a short first page."""

from __future__ import annotations

import importlib.util
import re

from tessera.config import key_docs
from tessera.train.recipes.runs import FinetuneConfig, PretrainConfig

from .conftest import PY, ROOT, run_cli


def test_the_site_builds_strictly(tmp_path):
    args = [PY, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    proc = run_cli(args, env={"NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_pages_are_what_the_code_generates(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")  # the generator sets its own width, whatever the terminal's
    generator = _generator()
    assert generator.main(["--check"]) == 0, capsys.readouterr().err
    page = (ROOT / "docs" / "reference" / "config.md").read_text()
    for doc in key_docs(FinetuneConfig) + key_docs(PretrainConfig):
        assert f"| `{doc.key}` |" in page, doc.key
    cli = (ROOT / "docs" / "reference" / "cli.md").read_text()
    for flag in ("--manifest", "--classes", "--format", "--out"):  # a few commands' own flags
        assert flag in cli


def test_the_readme_is_a_short_first_page_that_links_into_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert re.search(r"```bash\nbash scripts/demo\.sh .*\nbash scripts/test\.sh .*\n```", text.split("\n## ")[0])
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert "docs/reference/config.md" in links and "docs/reference/cli.md" in links
    assert all((ROOT / link).is_file() for link in links), [x for x in links if not (ROOT / x).is_file()]
