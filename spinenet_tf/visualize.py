"""Draws detections (boxes, class names, scores) on images."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw


def _colour(class_id: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((class_id * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image,
    detections: dict,
    label_map: dict | None = None,
    score_threshold: float = 0.3,
) -> Image.Image:
    """Returns a PIL image with each detection above score_threshold drawn on `image`.

    Args:
        image: uint8 [H, W, 3] array (or PIL image) in the frame of the boxes.
        detections: one image's "boxes" [N, 4] (ymin, xmin, ymax, xmax pixels), "scores" [N],
            "classes" [N] and optionally "num_detections".
        label_map: class id -> name; ids are printed where it has no entry.
    """
    canvas = (
        image.convert("RGB")
        if isinstance(image, Image.Image)
        else Image.fromarray(np.asarray(image, np.uint8))
    )
    canvas = canvas.copy()
    draw = ImageDraw.Draw(canvas)
    n = int(detections.get("num_detections", len(detections["scores"])))
    label_map = label_map or {}
    for box, score, cls in zip(
        np.asarray(detections["boxes"])[:n],
        np.asarray(detections["scores"])[:n],
        np.asarray(detections["classes"])[:n],
        strict=True,
    ):
        if score < score_threshold:
            continue
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        colour = _colour(int(cls))
        draw.rectangle([xmin, ymin, xmax, ymax], outline=colour, width=2)
        text = f"{label_map.get(int(cls), int(cls))} {score:.2f}"
        left, top, right, bottom = draw.textbbox((xmin, ymin), text)
        y = max(ymin - (bottom - top) - 2, 0)
        draw.rectangle([xmin, y, xmin + right - left + 2, y + bottom - top + 2], fill=colour)
        draw.text((xmin + 1, y), text, fill=(0, 0, 0))
    return canvas
