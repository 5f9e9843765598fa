"""The page itself: a plain record of sections (text, a command box, a figure, a table) and
one Jinja template that turns it into a self-contained HTML file.

Pages must open offline and be passed around as single files (supplementary material, chat
attachments), so plotly.js is inlined once per page and nothing is fetched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from linearize._io import write_text
from linearize._version import __version__


def fmt(value: Any) -> str:
    """A table cell's text: 4 significant digits for floats, thousands separators for ints."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _sort_key(value: Any) -> str:
    """What the page sorts on: the raw number, so 1e3 sorts after 999 whatever the display."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return fmt(value)


def _css(value: Any) -> str:
    if isinstance(value, str):
        return "long" if len(value) > 60 else "t"
    return ""


@dataclass
class Table:
    """Rows of raw values under ``columns``; ``marked`` rows are highlighted (e.g. removed
    layers)."""

    columns: list[str]
    rows: list[list[Any]]
    marked: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.marked = self.marked or [False] * len(self.rows)

    def cells(self) -> list[list[tuple[str, str, str]]]:
        """(text, sort key, CSS class) per cell: numbers align right, text left, and long text
        (a judged story) wraps instead of widening the table."""
        return [[(fmt(v), _sort_key(v), _css(v)) for v in row] for row in self.rows]

    @classmethod
    def from_dicts(
        cls, rows: list[dict], columns: list[str] | None = None, names: dict[str, str] | None = None
    ) -> Table:
        """A table of dict rows; ``names`` renames columns for display."""
        cols = columns or list(dict.fromkeys(k for r in rows for k in r))
        names = names or {}
        return cls([names.get(c, c) for c in cols], [[r.get(c) for c in cols] for r in rows])


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)  # a highlighted numbered list
    commands: list[str] = field(default_factory=list)  # shell commands to copy
    figure: str | None = None  # a plotly <div> from figure_html
    table: Table | None = None

    @property
    def anchor(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.title.lower()).strip("-")


@dataclass
class Page:
    title: str
    source: str  # the JSON file the page was rendered from
    meta: list[tuple[str, str]] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    subtitle: str = ""

    @property
    def has_figures(self) -> bool:
        return any(s.figure for s in self.sections)


def figure_html(fig) -> str:
    """A plotly figure as a <div> that resizes with its container (phones included)."""
    fig.update_layout(
        autosize=True,
        margin=dict(l=50, r=20, t=30, b=40),
        template="plotly_white",
        legend=dict(orientation="h", yanchor="top", y=-0.18, x=0),
    )
    return fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        default_width="100%",
        default_height="440px",
        config={"responsive": True, "displaylogo": False},
    )


@lru_cache(maxsize=1)
def _template():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("linearize.report", ""),
        undefined=StrictUndefined,
        autoescape=select_autoescape(["j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("page.html.j2")


@lru_cache(maxsize=1)
def _plotlyjs() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def write_page(page: Page, path: Path) -> Path:
    """Render ``page`` to ``path`` atomically."""
    html = _template().render(page=page, version=__version__, plotlyjs=_plotlyjs())
    write_text(Path(path), html)
    return Path(path)
