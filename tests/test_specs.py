import pytest

from spinenet_tf import specs


def test_every_model_id_resolves_and_unknown_ids_list_the_valid_ones():
    assert specs.MODEL_IDS == (
        "49S",
        "49",
        "96",
        "143",
        "143L",
        "190",
        "mobile-49XS",
        "mobile-49S",
        "mobile-49",
    )
    assert specs.get_scaling("190").block_repeats == 4
    with pytest.raises(ValueError, match=r"unknown model_id '48'; expected one of 49S, 49, 96"):
        specs.get_scaling("48")


def test_default_specs_are_valid_and_output_levels_2_to_7():
    for family in ("spinenet", "mobile"):
        block_specs = specs.validate_block_specs(specs.default_block_specs(family), family)
        assert len(block_specs) == 16
    assert specs.output_levels(specs.SPINENET_BLOCK_SPECS) == [2, 3, 4, 5, 6, 7]
    assert specs.output_levels(specs.SPINENET_MOBILE_BLOCK_SPECS) == [3, 4, 5, 6, 7]


def test_block_spec_accepts_tuples_lists_and_dicts_and_round_trips():
    spec = specs.BlockSpec.from_any((4, "bottleneck", [0, 1], True))
    assert spec == specs.BlockSpec(4, "bottleneck", (0, 1), True)
    assert specs.BlockSpec.from_any(spec.to_list()) == spec
    assert (
        specs.BlockSpec.from_any(
            {"level": 4, "block_fn": "bottleneck", "input_offsets": (0, 1), "is_output": True}
        )
        == spec
    )
    with pytest.raises(ValueError, match="must be"):
        specs.BlockSpec.from_any((4, "bottleneck", (0, 1)))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([(3, "bottleneck", (0, 2), True)], r"block spec 0 .*input offset 2 does not exist yet"),
        ([(8, "bottleneck", (0, 1), True)], r"block spec 0 .*level 8 is outside 1-7"),
        ([(0, "residual", (0, 1), True)], r"level 0 is outside"),
        (
            [(3, "bottleneck", (0, 1), True), (3, "residual", (1, 2), True)],
            r"block spec 1 .*a second output at level 3 \(block spec 0",
        ),
        ([(3, "mbconv", (0, 1), True)], r"block_fn 'mbconv' is not one of"),
        ([], "empty"),
    ],
)
def test_invalid_block_specs_name_the_culprit(rows, message):
    with pytest.raises(ValueError, match=message):
        specs.validate_block_specs(rows, "spinenet")


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="unknown family 'big'"):
        specs.default_block_specs("big")
