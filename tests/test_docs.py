"""The README and docs/ against the code: every ``linearize …`` line parses with the real
command line (options, choices of arguments' count; no work is run), and every link to a file
or a RESULTS.md section points at something that exists, so a renamed option, page or section
breaks the build instead of the reader."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from linearize.cli import app

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _shell_lines(text: str) -> list[str]:
    """Lines of ```bash blocks, continuations joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def linearize_calls(text: str) -> list[list[str]]:
    """The argument lists of every ``linearize`` call in the text's shell blocks (also after
    ``&&``, and ``-m linearize.cli`` under torchrun); redirections dropped."""
    calls = []
    for line in _shell_lines(text):
        for part in re.split(r"&&|\|", line):
            words = shlex.split(part.split(" > ", 1)[0])
            for i, w in enumerate(words):
                if w == "linearize" or (w == "linearize.cli" and i and words[i - 1] == "-m"):
                    calls.append(words[i + 1 :])
                    break
    return calls


def parse(args: list[str]) -> str | None:
    """Parse ``linearize ARGS`` as the real CLI would, without running the command; returns
    the usage error the CLI would print, or None. (typer ships its own copy of click, so its
    errors are told by their ``format_message``, not by click's classes.)"""
    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="linearize")
    cmd = group.get_command(ctx, args[0]) if args else None
    if cmd is None:
        return f"no such command: {args[:1]}"
    try:
        cmd.make_context(args[0], list(args[1:]), parent=ctx)
    except Exception as e:
        if not hasattr(e, "format_message"):
            raise
        return e.format_message()
    return None


def test_the_extraction_finds_calls_and_the_parser_refuses_a_wrong_option():
    text = "```bash\nlinearize prune --remove 8 && linearize export p --gguf x.gguf  # c\n```\n"
    assert linearize_calls(text) == [
        ["prune", "--remove", "8"],
        ["export", "p", "--gguf", "x.gguf"],
    ]
    assert parse(["prune", "--remove", "8", "--strategy", "last-k"]) is None
    assert "No such option" in parse(["prune", "--no-such-option", "1"])
    assert "no such command" in parse(["no-such-command"])
    assert "--tokens" in parse(["analyze", "--tokens", "many"])


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_line_in_the_docs_parses(doc):
    calls = linearize_calls(doc.read_text())
    bad = [f"linearize {shlex.join(a)}: {err}" for a in calls if (err := parse(a)) is not None]
    assert not bad, "\n".join(bad)


def test_the_docs_show_commands():
    assert sum(len(linearize_calls(d.read_text())) for d in DOCS) > 40


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_points_at_a_file_and_a_section_that_exist(doc):
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+\.md|[^)#\s]+\.png)?(#[^)\s]*)?\)", doc.read_text()):
        path, frag = target
        if not path and not frag:
            continue
        if path.startswith("http"):
            continue
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            missing.append(path)
            continue
        if frag and file.suffix == ".md":
            heads = [
                ln.lstrip("#").strip() for ln in file.read_text().splitlines() if ln.startswith("#")
            ]
            if frag[1:] not in {_anchor(h) for h in heads}:
                missing.append(f"{path}{frag}")
    assert not missing, missing


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_the_prune_page_lists_every_registered_strategy_and_replacement():
    """The registries can grow by one class; the page that explains the choices must follow."""
    from linearize.surgery.prune import replacements, strategies

    lines = (ROOT / "docs" / "prune.md").read_text().splitlines()
    named = {ln.split("`")[1] for ln in lines if ln.startswith(("| `", "- `"))}  # rows, items
    assert set(strategies.names()) <= named, set(strategies.names()) - named
    assert set(replacements.names()) <= named, set(replacements.names()) - named
