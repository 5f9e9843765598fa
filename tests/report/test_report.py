"""Run pages: rendered from each command's JSON, self-contained, and checked in a real headless
Chromium (Debian's ``chromium`` driven by Playwright): no console errors, one point per layer,
one table row per layer, sorting on click, no horizontal scroll at a phone's 390 px.

The JSON under tests/data/pages comes from real runs on the embedded SmolLM2 (the commands are
in tests/data/pages/README.md), so the screenshots in the README show real pages:
``LINEARIZE_SCREENSHOTS=docs/pages pytest tests/report/test_report.py`` rewrites them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from linearize.cli import app
from linearize.errors import LinearizeError
from linearize.report import PAGES, render

DATA = Path(__file__).parent.parent / "data" / "pages"


def _layers(d: dict) -> int:
    return len(d["layers"])


def _probe_layers(d: dict) -> int:
    return len(next(iter(d["probe"].values())))


@dataclass
class Case:
    json: str  # the file the command wrote
    chart: str  # section holding the chart to count points in
    points: Callable[[dict], int]  # points its first trace must draw
    table: str  # section holding the table to count and sort
    rows: Callable[[dict], int]  # rows it must have
    sort_col: int  # a column whose values differ, to sort on


def _rows(d: dict) -> int:
    return len(d["rows"])


CASES = {
    "analyze": Case("linearity.json", "per-layer-scores", _layers, "per-layer-table", _layers, 1),
    "prune": Case(
        "prune.json",
        "removed-layers",
        lambda d: d["original_layers"],
        "per-layer",
        lambda d: d["original_layers"],
        1,
    ),
    "prune-search": Case(
        "prune.json",
        "search",
        lambda d: len(d["search"]["trace"]),
        "search",
        lambda d: len(d["search"]["seeds"]) + 1,
        2,
    ),
    "sweep": Case(
        "sweep.json",
        "held-out-perplexity",
        lambda d: len(d["settings"]["ks"]),
        "every-cell",
        _rows,
        3,
    ),
    "dynamics": Case(
        "dynamics.json",
        "per-layer--without-residual",
        lambda d: len(d["rows"][0]["layers"]),
        "checkpoints",
        _rows,
        1,
    ),
    "eval": Case(
        "results.json", "linear-probing", _probe_layers, "linear-probing", _probe_layers, 2
    ),
    "compare": Case("compare.json", "metrics", _rows, "table", _rows, 2),
    "bench": Case("bench.json", "throughput-relative-to-the-first-model", _rows, "table", _rows, 1),
    "distill": Case(
        "distill.json",
        "held-out-perplexity-against-training-tokens",
        lambda d: sum(1 for r in d["rows"] if r.get("perplexity") not in (None, "")),
        "every-step",
        _rows,
        0,
    ),
    "compress": Case(
        "compress.json",
        "quality-against-speed",
        lambda d: len(d["stages"]["measure"]["quality"]),
        "quality-against-speed",
        lambda d: len(d["stages"]["measure"]["quality"]),
        2,
    ),
}


def _page(kind: str, tmp_path: Path) -> tuple[Path, dict]:
    """Copy a fixture run to tmp and render its page there."""
    src = DATA / kind
    dst = tmp_path / kind
    shutil.copytree(src, dst)
    name = CASES[kind].json
    return render(dst / name), json.loads((dst / name).read_text())


def test_fixtures_cover_every_page():
    assert {case.json for case in CASES.values()} == set(PAGES)
    for kind, case in CASES.items():
        assert (DATA / kind / case.json).is_file(), kind


@pytest.mark.parametrize("kind", list(CASES))
def test_pages_are_self_contained(kind, tmp_path):
    page, _ = _page(kind, tmp_path)
    html = page.read_text()
    from plotly.offline import get_plotlyjs

    plotly = get_plotlyjs()
    assert html.count(plotly[:200]) == 1 and plotly in html  # plotly.js inlined once, whole
    ours = html.replace(plotly, "")  # plotly.js itself holds links it never loads (its logo)
    for external in ('src="http', "src='http", 'href="http', "<link", "@import", "<script src"):
        assert external not in ours, external
    assert html.startswith("<!doctype html>") and '<meta name="viewport"' in html


def test_report_command_rebuilds_pages_and_refuses_bad_input(tmp_path):
    runner = CliRunner()
    for kind in ("analyze", "prune"):
        shutil.copytree(DATA / kind, tmp_path / kind)
    evals = tmp_path / "evals"
    shutil.copytree(DATA / "eval", evals / "m1")  # eval writes one directory per model
    res = runner.invoke(
        app, ["report", str(tmp_path / "analyze"), str(tmp_path / "prune"), str(evals)]
    )
    assert res.exit_code == 0, res.output
    for page in (
        tmp_path / "analyze" / "report.html",
        tmp_path / "prune" / "report.html",
        evals / "m1" / "report.html",
    ):
        assert page.stat().st_size > 1_000_000 and str(page) in res.output
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "linearity.json").write_text('{"model": "m", "layers": [')
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "prune.json").write_text('{"base_model": "m"}')
    for target, words in (
        (tmp_path / "empty", "no linearize output"),
        (tmp_path / "nope", "not a directory"),
        (broken, "cannot read"),
        (partial, "not a complete linearize prune file"),
    ):
        res = runner.invoke(app, ["report", str(target)])
        assert res.exit_code == 2 and words in res.stderr, (target, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
    assert not (broken / "report.html").exists() and not (partial / "report.html").exists()
    with pytest.raises(LinearizeError, match="no page for"):
        render(tmp_path / "analyze" / "linearity.csv")


def test_analyze_page_names_the_default_pruning_candidates(tmp_path):
    page, d = _page("analyze", tmp_path)
    html = page.read_text()
    n = len(d["layers"])
    k = round(n / 4)
    top = sorted(d["layers"], key=lambda r: r["linearity"], reverse=True)[:k]
    for r in top:
        assert f"layer {r['layer']}: linearity {r['linearity']:.5f}" in html
    assert f"linearize prune --remove {k} " in html  # the embedded model: no model argument
    assert d["model"] in html and f"{d['tokens']:,}" in html and d["config"]["torch"] in html


# -- in a real browser ------------------------------------------------------------------------------
def _chromium() -> str | None:
    return (
        os.environ.get("LINEARIZE_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    exe = _chromium()
    if sync_playwright is None or exe is None:
        if os.environ.get("LINEARIZE_REQUIRE_BROWSER"):
            pytest.fail("LINEARIZE_REQUIRE_BROWSER is set but Playwright or Chromium is missing")
        pytest.skip("needs Playwright for Python and a chromium binary (apt install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe)
        yield b
        b.close()


_POINTS = """(sel) => Array.from(document.querySelectorAll(sel + ' .js-plotly-plot .trace'))
    .map(t => t.querySelectorAll('.point').length)"""
_COLUMN = """([sel, col]) => Array.from(document.querySelectorAll(sel + ' tbody tr'))
    .map(r => r.cells[col].getAttribute('data-v'))"""
_NO_HSCROLL = "() => document.documentElement.scrollWidth <= document.documentElement.clientWidth"


def _open(browser, page_path: Path, width: int):
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_path.as_uri())
    page.wait_for_selector(".js-plotly-plot .trace")
    return page, errors


def _key(v: str):
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


@pytest.mark.parametrize("kind", list(CASES))
def test_page_in_chromium(kind, browser, tmp_path):
    page_path, d = _page(kind, tmp_path)
    case = CASES[kind]
    chart, table, col = case.chart, case.table, case.sort_col
    page, errors = _open(browser, page_path, 1000)
    drawn = page.evaluate(_POINTS, f"#{chart}")
    assert drawn and drawn[0] == case.points(d), drawn  # one point per layer (or model, or count)
    before = page.evaluate(_COLUMN, [f"#{table}", col])
    assert len(before) == case.rows(d)
    assert len(set(before)) > 1, "a column to sort must hold different values"
    header = page.locator(f"#{table} thead th").nth(col)
    header.click()
    up = page.evaluate(_COLUMN, [f"#{table}", col])
    assert up == sorted(before, key=_key) and header.get_attribute("aria-sort") == "ascending"
    header.click()
    down = page.evaluate(_COLUMN, [f"#{table}", col])
    assert (
        down == sorted(before, key=_key, reverse=True)
        and header.get_attribute("aria-sort") == "descending"
    )
    shots = os.environ.get("LINEARIZE_SCREENSHOTS")
    page.screenshot(
        path=str(Path(shots) / f"{kind}.png") if shots else str(tmp_path / f"{kind}.png"),
        full_page=True,
    )
    page.close()
    phone, phone_errors = _open(browser, page_path, 390)
    assert phone.evaluate(_NO_HSCROLL), "the page scrolls sideways at 390 px"
    assert phone.evaluate(_POINTS, f"#{chart}")[0] == case.points(d)
    phone.close()
    assert errors == [] and phone_errors == []


def test_command_pages_render_in_chromium(browser, tiny_dir, tmp_path):
    """The pages the commands themselves write (tiny model): analyze and prune."""
    from linearize import analyze
    from linearize.surgery.prune import PruneConfig, prune

    analyze(str(tiny_dir), "builtin", tokens=1024, seq_len=64, out=tmp_path / "a")
    prune(
        str(tiny_dir),
        PruneConfig(remove=1, tokens=1024, seq_len=64),
        eval_data="builtin:eval",
        eval_tokens=1024,
        out=tmp_path / "p",
        ood_data=None,
    )
    d = json.loads((tmp_path / "p" / "prune.json").read_text())
    assert [r["layer"] for r in d["initial"]] == [0, 1, 2] and d["steps"][0]["elapsed_s"] >= 0
    for page_path, chart, n in (
        (tmp_path / "a" / "report.html", "per-layer-scores", 3),
        (tmp_path / "p" / "report.html", "removed-layers", 3),
    ):
        page, errors = _open(browser, page_path, 390)
        assert page.evaluate(_POINTS, f"#{chart}")[0] == n
        assert page.evaluate(_NO_HSCROLL) and errors == []
        page.close()
