"""Instance masks from box-relative Mask R-CNN outputs to image pixels and COCO RLE.

A Mask R-CNN predicts each detection's mask as M x M (28 x 28) probabilities over its box.
`paste_masks` puts them into the image the way Detectron, tensorflow/tpu and Model Garden
(`ops/mask_ops.paste_instance_masks`) do for COCO evaluation: the mask gets a one-pixel zero
border, the box grows by (M + 2) / M about its centre to match, the padded mask is resized
bilinearly (half-pixel centres, edge values repeated: OpenCV's INTER_LINEAR) to the grown
box's integer pixel size and thresholded at 0.5. NumPy only, so a client of an exported
model can copy it without TensorFlow.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def _resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w] -> [height, width], bilinear with half-pixel centres, clamped at the edges."""

    def taps(out_size, in_size):
        src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
        src = np.clip(src, 0.0, in_size - 1)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, in_size - 1)
        return lo, hi, (src - lo).astype(np.float32)

    y0, y1, fy = taps(height, image.shape[0])
    x0, x1, fx = taps(width, image.shape[1])
    rows = image[y0] * (1.0 - fy)[:, None] + image[y1] * fy[:, None]
    return rows[:, x0] * (1.0 - fx)[None, :] + rows[:, x1] * fx[None, :]


def paste_masks(masks, boxes, height: int, width: int, threshold: float = 0.5) -> np.ndarray:
    """Box-relative masks [N, M, M] (probabilities) and their boxes [N, 4] (ymin, xmin, ymax,
    xmax in the image's pixels) -> binary masks [N, height, width] uint8."""
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    out = np.zeros((len(masks), height, width), np.uint8)
    if not len(masks):
        return out
    mask_h, mask_w = masks.shape[1:]
    scale = max((mask_w + 2.0) / mask_w, (mask_h + 2.0) / mask_h)
    cy, cx = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    half_h, half_w = (
        (boxes[:, 2] - boxes[:, 0]) / 2 * scale,
        (boxes[:, 3] - boxes[:, 1]) / 2 * scale,
    )
    # Truncated to integers as the reference does (astype(int32): towards zero).
    grown = np.stack([cy - half_h, cx - half_w, cy + half_h, cx + half_w], -1).astype(np.int32)
    padded = np.zeros((mask_h + 2, mask_w + 2), np.float32)
    for i, (y0, x0, y1, x1) in enumerate(grown.tolist()):
        h, w = max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)
        padded[1:-1, 1:-1] = masks[i]
        binary = (_resize_bilinear(padded, h, w) > threshold).astype(np.uint8)
        top, bottom = min(max(y0, 0), height), min(max(y0 + h, 0), height)
        left, right = min(max(x0, 0), width), min(max(x0 + w, 0), width)
        if bottom > top and right > left:
            out[i, top:bottom, left:right] = binary[top - y0 : bottom - y0, left - x0 : right - x0]
    return out


def encode_rle(masks: np.ndarray) -> list[dict]:
    """Binary masks [N, H, W] -> COCO RLEs (counts as str, JSON-ready)."""
    if not len(masks):
        return []
    rles = mask_utils.encode(np.asfortranarray(np.transpose(masks, (1, 2, 0)).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
