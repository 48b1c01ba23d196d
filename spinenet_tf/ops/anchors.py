"""Multi-level anchor boxes (RetinaNet, Lin et al. 2017, Sec. 4)."""

from __future__ import annotations

import dataclasses

import numpy as np

from spinenet_tf.ops.geometry import level_size


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    """Anchors per location: num_scales x len(aspect_ratios), sized anchor_size * 2**level.

    Aspect ratios are width / height. SpineNet uses 3 scales x (0.5, 1, 2) and anchor size 3
    (4 from SpineNet-143 on).
    """

    min_level: int = 3
    max_level: int = 7
    num_scales: int = 3
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_size: float = 3.0

    def __post_init__(self):
        object.__setattr__(self, "aspect_ratios", tuple(float(a) for a in self.aspect_ratios))
        if self.min_level > self.max_level or self.num_scales < 1 or not self.aspect_ratios:
            raise ValueError(f"invalid anchor config {self}")
        if self.anchor_size <= 0 or min(self.aspect_ratios) <= 0:
            raise ValueError(f"anchor_size and aspect_ratios must be > 0, got {self}")

    @property
    def num_anchors_per_location(self) -> int:
        return self.num_scales * len(self.aspect_ratios)

    @property
    def levels(self) -> range:
        return range(self.min_level, self.max_level + 1)

    def feature_size(self, image_hw, level: int) -> tuple[int, int]:
        return level_size(tuple(int(s) for s in image_hw), level)

    def level_grid(self, image_hw, level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One level's anchor centres and sizes in pixels (float64): yc [H_l] of each row,
        xc [W_l] of each column and (h, w) [A, 2] of each anchor shape (scales, then aspect
        ratios). The level's anchors are every (row, column, shape), in that order.

        As in Model Garden, the stride is image size / feature size, so the centres cover the
        image also when it is not a multiple of 2**level.
        """
        fh, fw = self.feature_size(image_hw, level)
        stride_y, stride_x = image_hw[0] / fh, image_hw[1] / fw
        yc = (np.arange(fh, dtype=np.float64) + 0.5) * stride_y
        xc = (np.arange(fw, dtype=np.float64) + 0.5) * stride_x
        sizes = []
        for scale in range(self.num_scales):
            base = self.anchor_size * 2**level * 2 ** (scale / self.num_scales)
            sizes += [(base * ratio**-0.5, base * ratio**0.5) for ratio in self.aspect_ratios]
        return yc, xc, np.array(sizes, np.float64)

    def level_boxes(self, image_hw, level: int) -> np.ndarray:
        """Anchors of one level, [H_l, W_l, A, 4] as (ymin, xmin, ymax, xmax) in pixels."""
        yc, xc, sizes = self.level_grid(image_hw, level)
        yc, xc = np.meshgrid(yc, xc, indexing="ij")
        boxes = [np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], -1) for h, w in sizes]
        return np.stack(boxes, axis=2).astype(np.float32)

    def boxes(self, image_hw) -> np.ndarray:
        """All anchors, levels concatenated in order: [N, 4]."""
        return np.concatenate(
            [self.level_boxes(image_hw, level).reshape(-1, 4) for level in self.levels], axis=0
        )

    def level_sizes(self, image_hw) -> list[int]:
        """Number of anchors of each level, in order."""
        return [
            int(np.prod(self.feature_size(image_hw, level))) * self.num_anchors_per_location
            for level in self.levels
        ]

    def num_anchors(self, image_hw) -> int:
        return sum(self.level_sizes(image_hw))

    def to_config(self) -> dict:
        return {**dataclasses.asdict(self), "aspect_ratios": list(self.aspect_ratios)}
