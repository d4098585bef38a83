"""Charts drawn on the server as SVG markup: no script, nothing fetched, the same under
any Content-Security-Policy. Every text in a chart (an entity, a rule id) goes through
markupsafe's escape, so the returned Markup is safe to put in a page as it is.

>>> svg = bar_chart([("a<b", 3), ("c", 1)], title="calls of <script>")
>>> "<script>" in svg, "&lt;script&gt;" in svg
(False, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from engine.core.text import shown

WIDTH = 720
HEIGHT = 220
LEFT = 44
RIGHT = 12
TOP = 26
BOTTOM = 34


@dataclass(frozen=True)
class Band:
    """A span of bars to shade (the alert's window), by bar index, inclusive."""

    first: int
    last: int
    label: str


def _nice_top(value: float) -> float:
    if value <= 0:
        return 1.0
    step = 10 ** (len(str(int(value))) - 1)
    return float(((int(value) // step) + 1) * step)


def bar_chart(
    bars: Sequence[tuple[str, float]],
    *,
    title: str,
    threshold: float | None = None,
    threshold_label: str = "",
    band: Band | None = None,
    label_every: int = 0,
    css_class: str = "chart",
) -> Markup:
    """Bars labelled by `bars`' texts (every `label_every`-th shown, 0: about eight),
    a dashed horizontal line at `threshold`, and a shaded `band`."""
    # Texts as every page shows them: shown() first, then escaped by Markup.format.
    title = shown(title)
    threshold_label = shown(threshold_label)
    bars = [(shown(label), value) for label, value in bars]
    count = max(1, len(bars))
    peak = max([v for _, v in bars] + [threshold or 0.0, 1.0])
    top = _nice_top(peak)
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    slot = plot_w / count
    every = label_every or max(1, count // 8)

    def y(value: float) -> float:
        return TOP + plot_h - plot_h * value / top

    parts = [
        Markup(
            '<svg class="{}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {} {}" '
            'role="img" aria-label="{}">'
        ).format(css_class, WIDTH, HEIGHT, title),
        Markup("<title>{}</title>").format(title),
        Markup('<text class="chart-title" x="{}" y="16">{}</text>').format(LEFT, title),
    ]
    if band is not None and bars:
        x0 = LEFT + band.first * slot
        x1 = LEFT + (band.last + 1) * slot
        parts.append(
            Markup(
                '<rect class="band" x="{:.1f}" y="{}" width="{:.1f}" height="{}">'
                "<title>{}</title></rect>"
            ).format(x0, TOP, max(1.0, x1 - x0), plot_h, band.label)
        )
    for tick in (0.0, top / 2, top):
        parts.append(
            Markup(
                '<line class="grid" x1="{}" x2="{}" y1="{:.1f}" y2="{:.1f}"/>'
                '<text class="axis" x="{}" y="{:.1f}" text-anchor="end">{:g}</text>'
            ).format(LEFT, WIDTH - RIGHT, y(tick), y(tick), LEFT - 4, y(tick) + 4, tick)
        )
    for index, (label, value) in enumerate(bars):
        x = LEFT + index * slot
        parts.append(
            Markup(
                '<rect class="bar" x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}">'
                "<title>{}: {:g}</title></rect>"
            ).format(
                x + slot * 0.1,
                y(value),
                max(0.5, slot * 0.8),
                TOP + plot_h - y(value),
                label,
                value,
            )
        )
        if index % every == 0:
            label_svg = Markup(
                '<text class="axis" x="{:.1f}" y="{}" text-anchor="middle">{}</text>'
            )
            parts.append(label_svg.format(x + slot / 2, HEIGHT - BOTTOM + 14, label))
    if threshold is not None:
        parts.append(
            Markup(
                '<line class="threshold" x1="{}" x2="{}" y1="{:.1f}" y2="{:.1f}"/>'
                '<text class="threshold-label" x="{}" y="{:.1f}" text-anchor="end">{}</text>'
            ).format(
                LEFT,
                WIDTH - RIGHT,
                y(threshold),
                y(threshold),
                WIDTH - RIGHT,
                y(threshold) - 4,
                threshold_label or f"threshold {threshold:g}",
            )
        )
    if not bars:
        parts.append(
            Markup('<text class="axis" x="{}" y="{}">no calls in the lake here</text>').format(
                LEFT + 10, TOP + plot_h / 2
            )
        )
    parts.append(Markup("</svg>"))
    return Markup("").join(parts)


__all__ = ["Band", "bar_chart", "escape"]
