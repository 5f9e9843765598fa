"""Figures and pages: PNGs (``png``), plotly figures (``figures``) and one self-contained HTML
page per run (``pages``), rendered from the JSON each command writes."""

from linearize.report.pages import PAGES, render, render_dir

__all__ = ["PAGES", "render", "render_dir"]
