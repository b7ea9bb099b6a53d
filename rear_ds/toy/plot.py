"""Line charts as PNG with Pillow only (no plotting library in the dependencies): the ablation's curves."""
from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def _ticks(lo: float, hi: float, n: int = 5) -> list:
    """About ``n`` round tick values covering [lo, hi]."""
    step = 10 ** math.floor(math.log10((hi - lo) / n)) if hi > lo else 1.0
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def line_panels(panels: list, path: str, panel_size: tuple = (420, 300)) -> str:
    """Panels side by side; each is (title, {label: [(xs, ys), ...]}): every label gets one colour, its first
    line is drawn thick (e.g. the mean over seeds), the others thin (the seeds). Written atomically."""
    w, h = panel_size
    left, right, top, bottom = 58, 12, 28, 70
    img = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=12)
    labels = list(dict.fromkeys(label for _, series in panels for label in series))
    colour = {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(labels)}
    for p, (title, series) in enumerate(panels):
        x0, x1, y0, y1 = p * w + left, (p + 1) * w - right, top, h - bottom
        draw.text((p * w + left, 6), title, fill="black", font=font)
        pts = [(x, y) for lines in series.values() for xs, ys in lines for x, y in zip(xs, ys)]
        if not pts:
            draw.text((x0 + 10, (y0 + y1) // 2), "(no data)", fill="gray", font=font)
            continue
        xlo, xhi = min(x for x, _ in pts), max(x for x, _ in pts)
        ylo, yhi = min(y for _, y in pts), max(y for _, y in pts)
        pad = (yhi - ylo) * 0.05 or abs(yhi) * 0.05 or 1.0
        ylo, yhi, xhi = ylo - pad, yhi + pad, xhi if xhi > xlo else xlo + 1

        def to_px(x, y):
            return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

        draw.rectangle((x0, y0, x1, y1), outline="black")
        for t in _ticks(ylo, yhi):
            _, py = to_px(xlo, t)
            draw.line((x0 - 4, py, x0, py), fill="black")
            draw.text((p * w + 4, py - 7), f"{t:.3g}", fill="black", font=font)
        for t in _ticks(xlo, xhi):
            px, _ = to_px(t, ylo)
            draw.line((px, y1, px, y1 + 4), fill="black")
            draw.text((px - 10, y1 + 6), f"{t:.0f}", fill="black", font=font)
        draw.text(((x0 + x1) // 2 - 12, y1 + 20), "step", fill="black", font=font)
        for label, lines in series.items():
            for i, (xs, ys) in enumerate(lines):
                if len(xs) > 1:
                    draw.line([to_px(x, y) for x, y in zip(xs, ys)], fill=colour[label], width=3 if i == 0 else 1)
        for i, label in enumerate(series):
            lx = x0 + 8 + i * ((x1 - x0) // max(1, len(series)))
            draw.line((lx, h - 18, lx + 18, h - 18), fill=colour[label], width=3)
            draw.text((lx + 22, h - 25), label, fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.png"
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
