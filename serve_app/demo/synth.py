"""Deterministic synthetic factory-parts images with YOLO labels.

Classes: bolt, nut, washer, defect (a cracked, rusted washer: open ring, rust colour).
Parts are drawn as polygons on varied backgrounds (gradients, stripes, speckle, metal
plate), rotated and scaled, partly occluded by clutter, then blurred and noised. Image
`i` of a split depends only on (seed, split, i), so the same call always yields the same
pixels and boxes.

    python -m serve_app.demo.synth OUT_DIR --train 300 --val 100 --size 320
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = ("bolt", "nut", "washer", "defect")
Point = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Box:
    """A labelled box in pixels."""

    cls: int
    x1: float
    y1: float
    x2: float
    y2: float

    def yolo(self, w: int, h: int) -> str:
        cx, cy = (self.x1 + self.x2) / 2 / w, (self.y1 + self.y2) / 2 / h
        return f"{self.cls} {cx:.6f} {cy:.6f} {(self.x2 - self.x1) / w:.6f} {(self.y2 - self.y1) / h:.6f}"


def _rot(points: list[Point], angle: float, cx: float, cy: float) -> list[Point]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _circle(r: float, n: int = 40) -> list[Point]:
    return [(r * math.cos(2 * math.pi * k / n), r * math.sin(2 * math.pi * k / n)) for k in range(n)]


def _hexagon(r: float) -> list[Point]:
    return [(r * math.cos(math.pi / 3 * k), r * math.sin(math.pi / 3 * k)) for k in range(6)]


def _metal(rng: random.Random) -> tuple[int, int, int]:
    g = rng.randint(120, 215)
    return (g + rng.randint(-12, 12), g + rng.randint(-12, 12), g + rng.randint(-8, 18))


def _background(rng: random.Random, size: int) -> Image.Image:
    kind = rng.choice(["gradient", "stripes", "speckle", "plate"])
    base = np.array([rng.randint(20, 235) for _ in range(3)], dtype=np.float32)
    other = np.array([rng.randint(20, 235) for _ in range(3)], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "gradient":
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) % 1.0
    elif kind == "stripes":
        t = 0.5 + 0.5 * np.sin((xx * rng.uniform(5, 30) + yy * rng.uniform(0, 10)) * math.pi)
    elif kind == "speckle":
        t = np.asarray(np.random.default_rng(rng.randrange(2**32)).random((size, size)), dtype=np.float32)
    else:
        t = np.full((size, size), 0.3, dtype=np.float32) + 0.1 * np.sin(xx * 40) * np.sin(yy * 3)
    img = base[None, None, :] * (1 - t[..., None]) + other[None, None, :] * t[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _draw_part(draw: ImageDraw.ImageDraw, rng: random.Random, cls: int, cx: float, cy: float, r: float) -> list[Point]:
    """Draw one part; return the outline points (for its box)."""
    angle = rng.uniform(0, 2 * math.pi)
    color = _metal(rng)
    dark = tuple(max(0, c - 70) for c in color)
    if cls == 0:  # bolt: hex head + threaded shank
        head = _rot([(x - r * 0.7, y) for x, y in _hexagon(r * 0.38)], angle, cx, cy)
        shank = [(-r * 0.4, -r * 0.16), (r, -r * 0.16), (r, r * 0.16), (-r * 0.4, r * 0.16)]
        shank_pts = _rot(shank, angle, cx, cy)
        draw.polygon(shank_pts, fill=color, outline=dark)
        for k in range(6):
            x = -r * 0.1 + k * r * 0.18
            draw.line(_rot([(x, -r * 0.16), (x + r * 0.06, r * 0.16)], angle, cx, cy), fill=dark, width=2)
        draw.polygon(head, fill=color, outline=dark)
        return head + shank_pts
    if cls == 1:  # nut: a thick hexagon, bevel ring and a small threaded hole, darker steel
        outer = _rot(_hexagon(r * 0.6), angle, cx, cy)
        steel = tuple(max(0, c - 45) for c in color)
        draw.polygon(outer, fill=steel, outline=dark, width=max(2, int(r * 0.08)))
        for x, y in outer:  # facet edges
            draw.line([(cx + (x - cx) * 0.75, cy + (y - cy) * 0.75), (x, y)], fill=dark, width=1)
        b = r * 0.45
        draw.ellipse([cx - b, cy - b, cx + b, cy + b], outline=color, width=max(1, int(r * 0.05)))
        h = r * 0.2
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=(20, 20, 20))
        return outer
    outer_r, inner_r = r * 0.6, r * 0.3
    if cls == 2:  # washer: a thin, bright, round ring with a large hole
        bright = tuple(min(255, c + 35) for c in color)
        hole = r * 0.36
        draw.ellipse([cx - outer_r, cy - outer_r, cx + outer_r, cy + outer_r], fill=bright, outline=dark)
        draw.arc(
            [cx - outer_r * 0.8, cy - outer_r * 0.8, cx + outer_r * 0.8, cy + outer_r * 0.8],
            200,
            320,
            fill=(255, 255, 255),
            width=max(1, int(r * 0.05)),
        )
        draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=dark)
        return [(cx - outer_r, cy - outer_r), (cx + outer_r, cy + outer_r)]
    # defect: a cracked, rusted washer: open ring with a wedge missing, rust patches
    rust = (rng.randint(140, 190), rng.randint(60, 95), rng.randint(20, 45))
    gap = rng.uniform(0.5, 0.9)
    start = math.degrees(angle)
    draw.pieslice(
        [cx - outer_r, cy - outer_r, cx + outer_r, cy + outer_r],
        start + math.degrees(gap),
        start + 360,
        fill=rust,
        outline=dark,
    )
    draw.ellipse([cx - inner_r, cy - inner_r, cx + inner_r, cy + inner_r], fill=dark)
    for _ in range(3):
        a = rng.uniform(0, 2 * math.pi)
        px, py = cx + math.cos(a) * r * 0.45, cy + math.sin(a) * r * 0.45
        s = r * rng.uniform(0.06, 0.12)
        draw.ellipse([px - s, py - s, px + s, py + s], fill=(rust[0] - 40, rust[1] - 30, rust[2]))
    return [(cx - outer_r, cy - outer_r), (cx + outer_r, cy + outer_r)]


def render(seed: int, split: str, index: int, size: int = 320) -> tuple[Image.Image, list[Box]]:
    """One image and its boxes; deterministic in (seed, split, index)."""
    rng = random.Random(f"{seed}/{split}/{index}")
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    boxes: list[Box] = []
    placed: list[tuple[float, float, float]] = []
    for _ in range(rng.randint(1, 6)):
        cls = rng.randrange(len(CLASSES))
        r = rng.uniform(size * 0.09, size * 0.17)
        for _attempt in range(20):
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            if all(math.hypot(cx - x, cy - y) > (r + pr) * 0.9 for x, y, pr in placed):
                break
        else:
            continue
        pts = _draw_part(draw, rng, cls, cx, cy, r)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        box = Box(cls, max(0.0, min(xs)), max(0.0, min(ys)), min(size - 1.0, max(xs)), min(size - 1.0, max(ys)))
        boxes.append(box)
        placed.append((cx, cy, r))
    for _ in range(rng.randint(0, 3)):  # clutter that partly occludes parts (at most a quarter of a box)
        b = rng.choice(boxes) if boxes else None
        if b is None:
            break
        w, h = (b.x2 - b.x1) * rng.uniform(0.15, 0.45), (b.y2 - b.y1) * rng.uniform(0.15, 0.45)
        x = rng.choice([b.x1 - w / 2, b.x2 - w / 2])
        y = rng.choice([b.y1 - h / 2, b.y2 - h / 2])
        draw.rectangle([x, y, x + w, y + h], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    arr = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(2, 12), arr.shape)
    img = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")
    return img, boxes


def scene(seed: int, split: str, index: int, width: int, height: int, tiles: int = 2) -> Image.Image:
    """A non-square scene of parts: square renders tiled over a width x height canvas.

    `tiles` renders span the long side, so a model letterboxing the scene to imgsz sees each
    tile at imgsz / tiles pixels; tiles at the edges are cropped. Deterministic in all arguments.
    Not used for training (`render` stays the training generator); for shape and parity tests.
    """
    side = max(1, math.ceil(max(width, height) / tiles))
    canvas = Image.new("RGB", (width, height))
    for row in range(math.ceil(height / side)):
        for col in range(math.ceil(width / side)):
            tile = render(seed, f"{split}/scene{index}", row * 64 + col)[0]
            canvas.paste(tile.resize((side, side), Image.Resampling.BILINEAR), (col * side, row * side))
    return canvas


def write_dataset(out: Path, seed: int = 0, train: int = 300, val: int = 100, size: int = 320) -> Path:
    """Write images/ and labels/ for train and val plus `data.yaml`; returns the yaml path."""
    for split, n in (("train", train), ("val", val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, boxes = render(seed, split, i, size)
            img.save(out / "images" / split / f"{i:05d}.jpg", quality=92)
            (out / "labels" / split / f"{i:05d}.txt").write_text("\n".join(b.yolo(size, size) for b in boxes) + "\n")
    yaml = out / "data.yaml"
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
    yaml.write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--size", type=int, default=320)
    a = ap.parse_args()
    print(write_dataset(a.out, a.seed, a.train, a.val, a.size))


if __name__ == "__main__":
    main()
