"""SpineNet and SpineNet-Mobile backbones (Du et al., arXiv 1912.05027 and 2010.11426).

Output contract: a dict {"P{level}": features} for level in [min_level, max_level], each of
shape [batch, ceil(H / 2**level), ceil(W / 2**level), endpoints_num_filters], for any input
size H x W (not only multiples of 128).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence

import keras

from spinenet_tf import specs as specs_lib
from spinenet_tf.layers.blocks import BLOCKS, block_output_channels
from spinenet_tf.layers.common import ConvSettings, get_activation
from spinenet_tf.layers.resample import Fusion, MobileResample, Resample

NUM_INIT_BLOCKS = 2


@dataclasses.dataclass
class _Node:
    """A block output in the scale-permuted network, as the builder tracks it."""

    tensor: object
    level: int
    block_fn: str
    channels: int
    out_degree: int = 0


@keras.saving.register_keras_serializable(package="spinenet_tf")
class SpineNet(keras.Model):
    """A scale-permuted backbone; see the module docstring for its outputs.

    Args:
        family: "spinenet" (residual / bottleneck blocks) or "mobile" (MBConv blocks).
        block_specs: BlockSpecs or (level, block_fn, (input0, input1), is_output) rows;
            defaults to the family's NAS result.
        endpoints_num_filters: width of every output level.
        filter_size_scale: multiplier on the per-level widths.
        resample_alpha: width of the cross-scale connections relative to the parent
            (spinenet family only).
        block_repeats: blocks per node of the network.
        min_level, max_level: output levels; each needs an output block in `block_specs`.
        activation: "relu" or "swish".
        init_stochastic_depth_rate: drop rate of the last block; block i of n gets
            rate * i / n.
        weighted_fusion: learn a normalised non-negative weight per parent.
        se_ratio, expand_ratio: MBConv settings (mobile family only).
        input_shape: (H, W, C) of the input; H and W may be None.
    """

    def __init__(
        self,
        family: str = "spinenet",
        block_specs: Sequence | None = None,
        endpoints_num_filters: int = 256,
        filter_size_scale: float = 1.0,
        resample_alpha: float = 0.5,
        block_repeats: int = 1,
        min_level: int = 3,
        max_level: int = 7,
        activation: str = "swish",
        init_stochastic_depth_rate: float = 0.0,
        weighted_fusion: bool = False,
        use_sync_bn: bool = False,
        norm_momentum: float = 0.99,
        norm_epsilon: float = 1e-3,
        kernel_initializer="VarianceScaling",
        kernel_regularizer=None,
        se_ratio: float = 0.2,
        expand_ratio: int = 6,
        input_shape: Sequence[int | None] = (None, None, 3),
        **kwargs,
    ):
        specs = specs_lib.validate_block_specs(
            block_specs or specs_lib.default_block_specs(family), family, NUM_INIT_BLOCKS
        )
        available = specs_lib.output_levels(specs)
        missing = [lvl for lvl in range(min_level, max_level + 1) if lvl not in available]
        if min_level > max_level or missing:
            raise ValueError(
                f"min_level={min_level}, max_level={max_level}: levels {missing or 'none'} "
                f"have no output block; the block specs output levels {available}"
            )
        if filter_size_scale <= 0 or resample_alpha <= 0 or block_repeats < 1:
            raise ValueError(
                f"filter_size_scale ({filter_size_scale}) and resample_alpha "
                f"({resample_alpha}) must be > 0 and block_repeats ({block_repeats}) >= 1"
            )
        if not 0.0 <= init_stochastic_depth_rate < 1.0:
            raise ValueError(
                f"init_stochastic_depth_rate {init_stochastic_depth_rate} must be in [0, 1)"
            )
        input_shape = tuple(input_shape)
        if len(input_shape) != 3:
            raise ValueError(f"input_shape {input_shape} must be (height, width, channels)")
        get_activation(activation)

        settings = ConvSettings(
            kernel_initializer=kernel_initializer,
            kernel_regularizer=kernel_regularizer,
            norm_momentum=norm_momentum,
            norm_epsilon=norm_epsilon,
            use_sync_bn=use_sync_bn,
        )
        config = {
            name: value
            for name, value in locals().items()
            if name in inspect.signature(SpineNet.__init__).parameters
            and name != "kwargs"
            and name != "self"
        }
        config["block_specs"] = [s.to_list() for s in specs]
        config["input_shape"] = list(input_shape)
        config["kernel_initializer"] = settings.kernel_initializer
        config["kernel_regularizer"] = settings.kernel_regularizer

        builder = _Builder(config, specs, settings)
        image = keras.Input(shape=input_shape, name="image")
        endpoints = builder.build(image)
        super().__init__(inputs=image, outputs=endpoints, **kwargs)
        self._spinenet_config = config
        self.block_specs = specs
        self.min_level, self.max_level = min_level, max_level
        self.endpoints_num_filters = endpoints_num_filters
        # What every conv and batch norm shares; heads on this backbone use the same.
        self.conv_settings = settings
        self.activation = activation
        # Top-level layer names in forward-execution order; the checkpoint converter pairs
        # variables with Model Garden's by this order.
        self.call_order = tuple(builder.call_order)

    @property
    def output_levels(self) -> list[int]:
        return list(range(self.min_level, self.max_level + 1))

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, **self._spinenet_config}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class _Builder:
    """Wires the functional graph of one SpineNet; kept apart so __init__ stays short."""

    def __init__(self, config: dict, specs, settings: ConvSettings):
        self.c = config
        self.specs = specs
        self.settings = settings
        self.mobile = config["family"] == "mobile"
        self.filter_map = (
            specs_lib.MOBILE_FILTER_SIZE_MAP if self.mobile else specs_lib.FILTER_SIZE_MAP
        )
        self.call_order: list[str] = []

    def _apply(self, layer, x):
        self.call_order.append(layer.name)
        return layer(x)

    def _filters(self, level: int) -> int:
        return int(self.filter_map[level] * self.c["filter_size_scale"])

    def _conv_bn_act(self, x, filters, kernel_size, strides, prefix, act=True):
        x = self._apply(self.settings.conv(filters, kernel_size, strides, name=f"{prefix}_conv"), x)
        x = self._apply(self.settings.norm(f"{prefix}_bn"), x)
        if act:
            x = keras.layers.Activation(get_activation(self.c["activation"]), name=f"{prefix}_act")(
                x
            )
        return x

    def _block_group(self, x, name, block_fn, filters, in_channels, strides, sd_rate):
        for r in range(self.c["block_repeats"]):
            common = dict(
                strides=strides if r == 0 else 1,
                stochastic_depth_rate=sd_rate,
                activation=self.c["activation"],
                settings=self.settings,
                name=f"{name}_{r}",
            )
            if block_fn == "mbconv":
                block = BLOCKS[block_fn](
                    filters,
                    in_filters=in_channels if r == 0 else filters,
                    expand_ratio=self.c["expand_ratio"],
                    se_ratio=self.c["se_ratio"],
                    **common,
                )
            else:
                out = block_output_channels(block_fn, filters)
                projection = r == 0 and (in_channels != out or strides != 1)
                block = BLOCKS[block_fn](filters, use_projection=projection, **common)
            x = self._apply(block, x)
        return x

    def _stem(self, image) -> list[_Node]:
        if self.mobile:
            x = self._conv_bn_act(image, self._filters(0), 3, 2, "stem")
            nodes, channels = [], self._filters(0)
            for k, strides in enumerate((1, 2)):
                filters = self._filters(k + 1)
                x = self._block_group(
                    x, f"init_block{k}", "mbconv", filters, channels, strides, 0.0
                )
                nodes.append(_Node(x, k + 1, "mbconv", filters))
                channels = filters
            return nodes
        x = self._conv_bn_act(image, 64, 7, 2, "stem")
        x = keras.layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)
        nodes, channels, filters = [], 64, self._filters(2)
        for k in range(NUM_INIT_BLOCKS):
            x = self._block_group(x, f"init_block{k}", "bottleneck", filters, channels, 1, 0.0)
            channels = block_output_channels("bottleneck", filters)
            nodes.append(_Node(x, 2, "bottleneck", channels))
        return nodes

    def _resample(self, node: _Node, level: int, out_channels: int, name: str, image):
        common = dict(activation=self.c["activation"], settings=self.settings, name=name)
        if self.mobile:
            layer = MobileResample(node.level, level, out_channels, **common)
        else:
            parent_filters = node.channels / 4 if node.block_fn == "bottleneck" else node.channels
            filters = int(parent_filters * self.c["resample_alpha"])
            layer = Resample(node.level, level, out_channels, filters=filters, **common)
        return self._apply(layer, [node.tensor, image])

    def build(self, image) -> dict:
        nodes = self._stem(image)
        outputs = {}
        n = len(self.specs)
        for i, spec in enumerate(self.specs):
            filters = self._filters(spec.level)
            out_channels = block_output_channels(spec.block_fn, filters)
            parents = []
            for j, offset in enumerate(spec.input_offsets):
                parent = nodes[offset]
                parents.append(
                    self._resample(parent, spec.level, out_channels, f"block{i}_resample{j}", image)
                )
                parent.out_degree += 1
            if spec.is_output:
                # Blocks nothing consumed are summed into the output block of their level and
                # width (paper Sec. 3.2).
                for node in nodes:
                    if (
                        node.out_degree == 0
                        and node.level == spec.level
                        and (node.channels == out_channels)
                    ):
                        parents.append(node.tensor)
                        node.out_degree += 1
            fusion = Fusion(
                len(parents),
                weighted=self.c["weighted_fusion"],
                activation=self.c["activation"],
                name=f"block{i}_fusion",
            )
            x = self._apply(fusion, parents)
            sd_rate = self.c["init_stochastic_depth_rate"] * (i + 1) / n
            x = self._block_group(x, f"block{i}", spec.block_fn, filters, out_channels, 1, sd_rate)
            nodes.append(_Node(x, spec.level, spec.block_fn, out_channels))
            if spec.is_output:
                outputs[spec.level] = x
        endpoints = {}
        for level in range(self.c["min_level"], self.c["max_level"] + 1):
            endpoints[f"P{level}"] = self._conv_bn_act(
                outputs[level], self.c["endpoints_num_filters"], 1, 1, f"P{level}"
            )
        return endpoints


BACKBONE_ARGS = frozenset(
    set(inspect.signature(SpineNet.__init__).parameters) - {"self", "kwargs"} | {"name", "dtype"}
)


def build_backbone(
    model_id: str | specs_lib.Scaling, input_shape=(None, None, 3), **overrides
) -> SpineNet:
    """Builds the SpineNet backbone `model_id` (see spinenet_tf.specs.MODEL_IDS), or of a
    scaling-table row.

    `overrides` are SpineNet constructor arguments replacing the scaling table's values.
    """
    if isinstance(model_id, specs_lib.Scaling):
        scaling, model_id = model_id, model_id.model_id
    else:
        scaling = specs_lib.get_scaling(model_id)
    unknown = sorted(set(overrides) - BACKBONE_ARGS)
    if unknown:
        raise ValueError(
            f"unknown override(s) {unknown} for build_backbone; expected some of "
            f"{sorted(BACKBONE_ARGS)}"
        )
    kwargs = dict(
        family=scaling.family,
        endpoints_num_filters=scaling.endpoints_num_filters,
        filter_size_scale=scaling.filter_size_scale,
        resample_alpha=scaling.resample_alpha,
        block_repeats=scaling.block_repeats,
        activation=scaling.activation,
        input_shape=input_shape,
        name=f"spinenet_{model_id.lower().replace('-', '_')}",
    )
    kwargs.update(overrides)
    return SpineNet(**kwargs)
