"""Pictures a person reads: detections (class names, scores) and ground truth drawn on images,
an image's top classes written beneath it, at a readable size, and contact sheets of many."""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spinenet_tf.ops.masks import paste_masks

# Small images are enlarged to at least this many pixels on the long side before drawing,
# so that boxes and labels are legible (the shapes data is 128 px).
MIN_DRAW_SIZE = 512
GROUNDTRUTH_COLOUR = (255, 255, 255)


def _colour(class_id: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((class_id * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow's scalable font (FreeType)
    except (TypeError, OSError):  # an old Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _canvas(image, min_size: int) -> tuple[Image.Image, float]:
    canvas = (
        image.convert("RGB")
        if isinstance(image, Image.Image)
        else Image.fromarray(np.asarray(image, np.uint8))
    )
    scale = max(1.0, min_size / max(canvas.size))
    if scale > 1.0:
        size = (round(canvas.width * scale), round(canvas.height * scale))
        return canvas.resize(size, Image.Resampling.BICUBIC), scale
    return canvas.copy(), scale


class _Labels:
    """Places label boxes so that none covers another: above the box, else inside its top,
    else further down, in steps of a label's height."""

    def __init__(self, draw: ImageDraw.ImageDraw, font, size: tuple[int, int]):
        self.draw, self.font, self.size = draw, font, size
        self.placed: list[tuple[float, float, float, float]] = []

    def _free(self, rect) -> bool:
        x0, y0, x1, y1 = rect
        return all(x1 <= a or b <= x0 or y1 <= c or d <= y0 for a, c, b, d in self.placed)

    def add(self, text: str, x: float, top: float, colour, text_colour):
        left, upper, right, lower = self.draw.textbbox((0, 0), text, font=self.font)
        w, h = right - left + 4, lower - upper + 4
        x = min(max(x, 0), max(self.size[0] - w, 0))
        candidates = [top - h, top] + [top + h * k for k in range(1, 40)]
        y = next(
            (
                y
                for y in candidates
                if 0 <= y <= self.size[1] - h and self._free((x, y, x + w, y + h))
            ),
            max(top - h, 0),
        )
        self.placed.append((x, y, x + w, y + h))
        self.draw.rectangle([x, y, x + w, y + h], fill=colour)
        self.draw.text((x + 2 - left, y + 2 - upper), text, fill=text_colour, font=self.font)


def draw_detections(
    image,
    detections: dict,
    label_map: dict | None = None,
    score_threshold: float = 0.3,
    groundtruth: dict | None = None,
    min_size: int = MIN_DRAW_SIZE,
) -> Image.Image:
    """Returns a PIL image with each detection above score_threshold drawn on `image`, and
    the ground truth (if given) in white beneath them.

    Args:
        image: uint8 [H, W, 3] array (or PIL image) in the frame of the boxes.
        detections: one image's "boxes" [N, 4] (ymin, xmin, ymax, xmax pixels), "scores" [N],
            "classes" [N] and optionally "num_detections" and "masks" [N, M, M] (each
            box's mask probabilities, Mask R-CNN's; shaded in the class colour).
        label_map: class id -> name; ids are printed where it has no entry.
        groundtruth: optional {"boxes" [M, 4], "classes" [M]} in the same frame; rows of class
            <= 0 are padding.
        min_size: the image is enlarged (bicubic) to at least this long side first.
    """
    canvas, scale = _canvas(image, min_size)
    n = int(detections.get("num_detections", len(detections["scores"])))
    if "masks" in detections:
        canvas = _shade_masks(canvas, detections, n, scale, score_threshold)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(12, round(max(canvas.size) / 40)))
    labels = _Labels(draw, font, canvas.size)
    label_map = label_map or {}
    width = max(2, round(max(canvas.size) / 250))

    def name(cls: int) -> str:
        return label_map.get(cls, str(cls))

    if groundtruth is not None:
        for box, cls in zip(
            np.asarray(groundtruth["boxes"]), np.asarray(groundtruth["classes"]), strict=True
        ):
            if cls <= 0:
                continue
            ymin, xmin, ymax, xmax = (float(v) * scale for v in box)
            draw.rectangle([xmin, ymin, xmax, ymax], outline=(0, 0, 0), width=width + 2)
            draw.rectangle([xmin, ymin, xmax, ymax], outline=GROUNDTRUTH_COLOUR, width=width)
            labels.add(name(int(cls)), xmin, ymax, GROUNDTRUTH_COLOUR, (0, 0, 0))  # at the bottom
    for box, score, cls in zip(
        np.asarray(detections["boxes"])[:n],
        np.asarray(detections["scores"])[:n],
        np.asarray(detections["classes"])[:n],
        strict=True,
    ):
        if score < score_threshold:
            continue
        ymin, xmin, ymax, xmax = (float(v) * scale for v in box)
        colour = _colour(int(cls))
        draw.rectangle([xmin, ymin, xmax, ymax], outline=colour, width=width)
        labels.add(f"{name(int(cls))} {score:.2f}", xmin, ymin, colour, (0, 0, 0))
    return canvas


def _shade_masks(canvas, detections, n, scale, score_threshold, opacity=0.45):
    """The canvas with each kept detection's mask (pasted at its box) blended in its colour."""
    keep = np.asarray(detections["scores"])[:n] >= score_threshold
    if not keep.any():
        return canvas
    boxes = np.asarray(detections["boxes"], np.float64)[:n][keep] * scale
    pasted = paste_masks(
        np.asarray(detections["masks"])[:n][keep], boxes, canvas.height, canvas.width
    )
    pixels = np.asarray(canvas, np.float32)
    for mask, cls in zip(pasted, np.asarray(detections["classes"])[:n][keep], strict=True):
        on = mask.astype(bool)
        pixels[on] = (1 - opacity) * pixels[on] + opacity * np.asarray(
            _colour(int(cls)), np.float32
        )
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


DETECTION_LEGEND = "white: ground truth    coloured: detections (class score)"
CLASSIFICATION_LEGEND = "top classes with probabilities; green: the true class, red: a wrong top 1"
CORRECT_COLOUR, WRONG_COLOUR = (90, 220, 90), (240, 80, 80)


def draw_classification(
    image,
    classes,
    scores,
    label_map: dict | None = None,
    label: int | None = None,
    min_size: int = MIN_DRAW_SIZE,
) -> Image.Image:
    """Returns a PIL image of `image` (enlarged to at least min_size on the long side) above
    a panel listing the top classes ([k] ids, best first) with their probabilities, and the
    true class when `label` is given (green where a listed class is it, red for a wrong
    first guess). With a label map, ids it does not name (index 0 of a 1001-way ImageNet
    classifier, which no image has) are left off the list."""
    canvas, _ = _canvas(image, min_size)
    label_map = label_map or {}
    top = [(int(c), float(s)) for c, s in zip(np.asarray(classes), np.asarray(scores), strict=True)]
    if label_map:
        top = [(c, s) for c, s in top if c in label_map]
    font = _font(max(12, round(max(canvas.size) / 32)))
    line_h = font.getbbox("Ag")[3] + 6
    lines = []
    if label is not None:
        lines.append((f"truth: {label_map.get(int(label), str(int(label)))}", (230, 230, 230)))
    for rank, (cls, score) in enumerate(top):
        colour = (230, 230, 230)
        if label is not None and cls == int(label):
            colour = CORRECT_COLOUR
        elif label is not None and rank == 0:
            colour = WRONG_COLOUR
        lines.append((f"{rank + 1}. {label_map.get(cls, str(cls))}  {score:.2f}", colour))
    out = Image.new("RGB", (canvas.width, canvas.height + line_h * len(lines) + 8), (32, 32, 32))
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, (text, colour) in enumerate(lines):
        draw.text((8, canvas.height + 4 + i * line_h), text, fill=colour, font=font)
    return out


def contact_sheet(
    images: list[tuple[str, Image.Image]],
    tile: int = 384,
    columns: int | None = None,
    legend: str = DETECTION_LEGEND,
) -> Image.Image:
    """One image: a grid of (caption, image) tiles, each fitted into tile x tile, with a
    legend line at the top (by default: ground truth white, detections coloured by class)."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    font = _font(max(12, tile // 24))
    caption_h = font.getbbox("Ag")[3] + 8
    legend_h = caption_h + 4
    sheet = Image.new("RGB", (columns * tile, legend_h + rows * (tile + caption_h)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 4), legend, fill=(230, 230, 230), font=font)
    for i, (caption, image) in enumerate(images):
        r, c = divmod(i, columns)
        thumb = image.copy()
        thumb.thumbnail((tile, tile), Image.Resampling.LANCZOS)
        x, y = c * tile, legend_h + r * (tile + caption_h)
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        draw.text((x + 6, y + tile + 2), caption, fill=(230, 230, 230), font=font)
    return sheet
