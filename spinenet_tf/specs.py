"""SpineNet block specs and scaling tables as data (Du et al., arXiv 1912.05027, Table 1 and 4)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

MIN_SPEC_LEVEL, MAX_SPEC_LEVEL = 1, 7

# Channels of a block at each level before filter_size_scale (paper Sec. 3.1); bottleneck
# blocks output 4x this.
FILTER_SIZE_MAP = {1: 32, 2: 64, 3: 128, 4: 256, 5: 256, 6: 256, 7: 256}
# SpineNet-Mobile (arXiv 2010.11426): level 0 is the stem conv's width.
MOBILE_FILTER_SIZE_MAP = {0: 8, 1: 16, 2: 24, 3: 40, 4: 80, 5: 112, 6: 112, 7: 112}


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block of the scale-permuted network.

    `input_offsets` index the list of blocks built so far, the two stem blocks being 0 and 1.
    """

    level: int
    block_fn: str
    input_offsets: tuple[int, int]
    is_output: bool

    @classmethod
    def from_any(cls, spec: BlockSpec | Sequence[Any] | dict) -> BlockSpec:
        if isinstance(spec, BlockSpec):
            return spec
        if isinstance(spec, dict):
            spec = (spec["level"], spec["block_fn"], spec["input_offsets"], spec["is_output"])
        if len(spec) != 4:
            raise ValueError(
                f"block spec {spec!r} must be (level, block_fn, (input0, input1), is_output)"
            )
        level, block_fn, offsets, is_output = spec
        return cls(int(level), str(block_fn), tuple(int(o) for o in offsets), bool(is_output))

    def to_list(self) -> list:
        return [self.level, self.block_fn, list(self.input_offsets), self.is_output]


def _specs(rows: Iterable[tuple]) -> tuple[BlockSpec, ...]:
    return tuple(BlockSpec.from_any(r) for r in rows)


# The 15 blocks found by NAS (paper Fig. 4 / Table 1). The last row is Model Garden's
# extra level-2 output: it gives P2 when min_level=2 and, as in Model Garden, counts in the
# stochastic-depth schedule (rate_i = init_rate * i / 16).
SPINENET_BLOCK_SPECS = _specs(
    [
        (2, "bottleneck", (0, 1), False),
        (4, "residual", (0, 1), False),
        (3, "bottleneck", (2, 3), False),
        (4, "bottleneck", (2, 4), False),
        (6, "residual", (3, 5), False),
        (4, "bottleneck", (3, 5), False),
        (5, "residual", (6, 7), False),
        (7, "residual", (6, 8), False),
        (5, "bottleneck", (8, 9), False),
        (5, "bottleneck", (8, 10), False),
        (4, "bottleneck", (5, 10), True),
        (3, "bottleneck", (4, 10), True),
        (5, "bottleneck", (7, 12), True),
        (7, "bottleneck", (5, 14), True),
        (6, "bottleneck", (12, 14), True),
        (2, "bottleneck", (2, 13), True),
    ]
)

SPINENET_MOBILE_BLOCK_SPECS = _specs(
    [
        (2, "mbconv", (0, 1), False),
        (2, "mbconv", (1, 2), False),
        (4, "mbconv", (1, 2), False),
        (3, "mbconv", (3, 4), False),
        (4, "mbconv", (3, 5), False),
        (6, "mbconv", (4, 6), False),
        (4, "mbconv", (4, 6), False),
        (5, "mbconv", (7, 8), False),
        (7, "mbconv", (7, 9), False),
        (5, "mbconv", (9, 10), False),
        (5, "mbconv", (9, 11), False),
        (4, "mbconv", (6, 11), True),
        (3, "mbconv", (5, 11), True),
        (5, "mbconv", (8, 13), True),
        (7, "mbconv", (6, 15), True),
        (6, "mbconv", (13, 15), True),
    ]
)


@dataclasses.dataclass(frozen=True)
class Scaling:
    """One row of the scaling table (paper Table 1; SpineNet-Mobile Table 1)."""

    model_id: str
    family: str  # "spinenet" or "mobile"
    endpoints_num_filters: int
    filter_size_scale: float
    resample_alpha: float
    block_repeats: int
    activation: str
    # RetinaNet head and anchors (Model Garden's SpineNet COCO configs; paper Sec. 5.1).
    head_num_convs: int = 4
    head_num_filters: int = 256
    head_separable: bool = False
    anchor_size: float = 3.0


# Activations follow the paper's protocol C and Model Garden's SpineNet COCO configs.
SCALINGS: dict[str, Scaling] = {
    s.model_id: s
    for s in [
        Scaling(
            model_id="49S",
            family="spinenet",
            endpoints_num_filters=128,
            filter_size_scale=0.65,
            resample_alpha=0.5,
            block_repeats=1,
            activation="swish",
            head_num_convs=4,
            head_num_filters=128,
            head_separable=False,
            anchor_size=3.0,
        ),
        Scaling(
            model_id="49",
            family="spinenet",
            endpoints_num_filters=256,
            filter_size_scale=1.0,
            resample_alpha=0.5,
            block_repeats=1,
            activation="swish",
            head_num_convs=4,
            head_num_filters=256,
            head_separable=False,
            anchor_size=3.0,
        ),
        Scaling(
            model_id="96",
            family="spinenet",
            endpoints_num_filters=256,
            filter_size_scale=1.0,
            resample_alpha=0.5,
            block_repeats=2,
            activation="swish",
            head_num_convs=4,
            head_num_filters=256,
            head_separable=False,
            anchor_size=3.0,
        ),
        Scaling(
            model_id="143",
            family="spinenet",
            endpoints_num_filters=256,
            filter_size_scale=1.0,
            resample_alpha=1.0,
            block_repeats=3,
            activation="swish",
            head_num_convs=4,
            head_num_filters=256,
            head_separable=False,
            anchor_size=4.0,
        ),
        Scaling(
            model_id="143L",
            family="spinenet",
            endpoints_num_filters=256,
            filter_size_scale=1.3,
            resample_alpha=1.0,
            block_repeats=3,
            activation="swish",
            head_num_convs=4,
            head_num_filters=256,
            head_separable=False,
            anchor_size=4.0,
        ),
        Scaling(
            model_id="190",
            family="spinenet",
            endpoints_num_filters=512,
            filter_size_scale=1.3,
            resample_alpha=1.0,
            block_repeats=4,
            activation="swish",
            head_num_convs=7,
            head_num_filters=512,
            head_separable=False,
            anchor_size=4.0,
        ),
        Scaling(
            model_id="mobile-49XS",
            family="mobile",
            endpoints_num_filters=24,
            filter_size_scale=0.6,
            resample_alpha=1.0,
            block_repeats=1,
            activation="swish",
            head_num_convs=4,
            head_num_filters=24,
            head_separable=True,
            anchor_size=3.0,
        ),
        Scaling(
            model_id="mobile-49S",
            family="mobile",
            endpoints_num_filters=40,
            filter_size_scale=0.65,
            resample_alpha=1.0,
            block_repeats=1,
            activation="swish",
            head_num_convs=4,
            head_num_filters=40,
            head_separable=True,
            anchor_size=3.0,
        ),
        Scaling(
            model_id="mobile-49",
            family="mobile",
            endpoints_num_filters=48,
            filter_size_scale=1.0,
            resample_alpha=1.0,
            block_repeats=1,
            activation="swish",
            head_num_convs=4,
            head_num_filters=48,
            head_separable=True,
            anchor_size=3.0,
        ),
    ]
}
MODEL_IDS = tuple(SCALINGS)

# Input sizes of the paper's detection results (Table 3) and of SpineNet-Mobile's.
PAPER_IMAGE_SIZES = {
    "49S": 640,
    "49": 640,
    "96": 1024,
    "143": 1280,
    "143L": 1280,
    "190": 1280,
    "mobile-49XS": 256,
    "mobile-49S": 384,
    "mobile-49": 384,
}


def get_scaling(model_id: str) -> Scaling:
    key = str(model_id)
    if key not in SCALINGS:
        raise ValueError(f"unknown model_id {model_id!r}; expected one of {', '.join(MODEL_IDS)}")
    return SCALINGS[key]


def default_block_specs(family: str) -> tuple[BlockSpec, ...]:
    if family == "spinenet":
        return SPINENET_BLOCK_SPECS
    if family == "mobile":
        return SPINENET_MOBILE_BLOCK_SPECS
    raise ValueError(f"unknown family {family!r}; expected 'spinenet' or 'mobile'")


def validate_block_specs(
    block_specs: Sequence[BlockSpec | Sequence[Any] | dict],
    family: str,
    num_init_blocks: int = 2,
) -> tuple[BlockSpec, ...]:
    """Returns the specs as BlockSpecs, or raises ValueError naming the first bad one."""
    specs = tuple(BlockSpec.from_any(s) for s in block_specs)
    if not specs:
        raise ValueError("block_specs is empty")
    allowed = ("mbconv",) if family == "mobile" else ("residual", "bottleneck")
    output_levels: dict[int, int] = {}
    for i, spec in enumerate(specs):
        where = f"block spec {i} {spec.to_list()}"
        if not MIN_SPEC_LEVEL <= spec.level <= MAX_SPEC_LEVEL:
            raise ValueError(
                f"{where}: level {spec.level} is outside {MIN_SPEC_LEVEL}-{MAX_SPEC_LEVEL}"
            )
        if spec.block_fn not in allowed:
            raise ValueError(
                f"{where}: block_fn {spec.block_fn!r} is not one of {allowed} for {family}"
            )
        if len(spec.input_offsets) != 2:
            raise ValueError(f"{where}: needs exactly two input offsets")
        available = num_init_blocks + i
        for offset in spec.input_offsets:
            if not 0 <= offset < available:
                raise ValueError(
                    f"{where}: input offset {offset} does not exist yet; blocks 0-"
                    f"{available - 1} are built before this one"
                )
        if spec.is_output:
            if spec.level in output_levels:
                raise ValueError(
                    f"{where}: a second output at level {spec.level} "
                    f"(block spec {output_levels[spec.level]} is already its output)"
                )
            output_levels[spec.level] = i
    return specs


def output_levels(block_specs: Sequence[BlockSpec]) -> list[int]:
    return sorted(s.level for s in block_specs if s.is_output)
