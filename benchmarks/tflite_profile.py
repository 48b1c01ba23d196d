"""Where a .tflite file's time goes, op by op, and what int8 can gain on this CPU at all.

    python benchmarks/tflite_profile.py ops FILE.tflite [FILE2.tflite ...] [--threads=1]
    python benchmarks/tflite_profile.py convs [--threads=1]

`ops`: every op of the file becomes a one-op model, fed the values it sees in a run of the
whole file on benchmarks/tflite.py's photo-like test image (TFLite's reference kernels
compute them), and is timed alone with the ai-edge-litert interpreter and its default
XNNPACK delegate (minimum of --iters invocations). Prints the time per op type and input
dtype, whether XNNPACK takes the op, and the slowest ops. The sum includes the
interpreter's call overhead per op (a few microseconds) and misses XNNPACK's fusions across
ops; it lands within 10% of the whole file's time here.

`convs`: single convolutions (the shapes of SpineNet-Mobile and wide ones) converted to
float32 and to int8 (per-channel and per-tensor weights), timed in the same interpreter with
XNNPACK and with TFLite's own kernels: the speed-up int8 convolutions can give on this CPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

DTYPES = {0: "f32", 1: "f16", 2: "i32", 3: "u8", 4: "i64", 6: "bool", 9: "i8"}


def _time(interpreter, iters: int) -> float:
    """Minimum seconds of one invocation (the CPU is shared: the minimum is the stable
    statistic)."""
    for _ in range(2):
        interpreter.invoke()
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - begin)
    return min(times)


def _test_image(size: int) -> np.ndarray:
    from benchmarks.tflite import photo_like
    from spinenet_tf.tasks.base import ImageServing

    return ImageServing((size, size)).preprocess(photo_like(size, seed=1000)[None])[0].numpy()


def _op_name(model, op) -> str:
    from tensorflow.lite.python import schema_py_generated as schema

    code = model.operatorCodes[op.opcodeIndex]
    if code.customCode:
        return code.customCode.decode()
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return names[builtin]


def profile_ops(path: str, threads: int, iters: int, top: int) -> None:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tensorflow.lite.tools import flatbuffer_utils

    reference = Interpreter(
        model_path=path,
        num_threads=1,
        experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    reference.allocate_tensors()
    (detail,) = reference.get_input_details()
    image = _test_image(int(detail["shape"][1]))
    if detail["dtype"] != np.float32:
        scale, zero = detail["quantization"]
        image = np.clip(np.round(image / scale + zero), 0, 255).astype(detail["dtype"])
    reference.set_tensor(detail["index"], image)
    reference.invoke()

    whole = Interpreter(model_path=path, num_threads=threads)
    whole.allocate_tensors()
    whole.set_tensor(detail["index"], image)
    whole_ms = _time(whole, iters) * 1e3

    model = flatbuffer_utils.read_model(path)
    model.signatureDefs = []
    graph = model.subgraphs[0]
    ops = list(graph.operators)
    constant = {
        i
        for i, t in enumerate(graph.tensors)
        if model.buffers[t.buffer].data is not None and len(model.buffers[t.buffer].data)
    }
    rows = []
    for op in ops:
        inputs = [i for i in op.inputs if i >= 0 and i not in constant]
        graph.operators = [op]
        graph.inputs = np.array(inputs, np.int32)
        graph.outputs = np.array(op.outputs, np.int32)
        single = Interpreter(
            model_content=bytes(flatbuffer_utils.convert_object_to_bytearray(model)),
            num_threads=threads,
        )
        single.allocate_tensors()
        for i in inputs:
            single.set_tensor(i, reference.get_tensor(i))
        first, out = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
        rows.append(
            {
                "op": _op_name(model, op),
                "dtype": DTYPES.get(first.type, str(first.type)),
                "in": [int(d) for d in first.shape],
                "out": [int(d) for d in out.shape],
                "xnnpack": any(d["op_name"] == "DELEGATE" for d in single._get_ops_details()),
                "ms": _time(single, iters) * 1e3,
                "name": out.name.decode()[-70:],
            }
        )
    total = sum(r["ms"] for r in rows)
    print(f"\n{path}: {len(rows)} ops, whole file {whole_ms:.2f} ms, sum of ops {total:.2f} ms")
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["op"], r["dtype"])].append(r)
    print("| op | input | count | not XNNPACK | ms |")
    print("|---|---|---|---|---|")
    for (op, dtype), group in sorted(groups.items(), key=lambda kv: -sum(r["ms"] for r in kv[1])):
        ms = sum(r["ms"] for r in group)
        outside = sum(not r["xnnpack"] for r in group)
        print(f"| {op} | {dtype} | {len(group)} | {outside} | {ms:.2f} |")
    print(f"slowest {top}:")
    for r in sorted(rows, key=lambda r: -r["ms"])[:top]:
        print(f"  {r['ms']:6.3f} ms {r['op']} {r['dtype']} {r['in']} -> {r['out']}  {r['name']}")


CONVS = (  # name, spatial size, input channels, output channels, kernel, depthwise
    ("1x1 9->54 @128 (49XS block)", 128, 9, 54, 1, False),
    ("1x1 24->9 @128 (49XS block)", 128, 24, 9, 1, False),
    ("1x1 14->84 @64 (49XS block)", 64, 14, 84, 1, False),
    ("1x1 24->819 @32 (49XS classifier)", 32, 24, 819, 1, False),
    ("depthwise 3x3 84 @64 (49XS block)", 64, 84, 84, 3, True),
    ("1x1 64->64 @64", 64, 64, 64, 1, False),
    ("1x1 256->256 @32", 32, 256, 256, 1, False),
    ("3x3 128->128 @32", 32, 128, 128, 3, False),
    ("3x3 256->256 @32", 32, 256, 256, 3, False),
)


def _conv_file(h, cin, cout, k, depthwise, quantization: str) -> bytes:
    import tensorflow as tf

    rng = np.random.default_rng(1)
    if depthwise:
        kernel = rng.normal(0, 0.3, (k, k, cin, 1)).astype(np.float32)

        def fn(x):
            return tf.nn.depthwise_conv2d(x, tf.constant(kernel), [1, 1, 1, 1], "SAME")

    else:
        kernel = rng.normal(0, 0.3, (k, k, cin, cout)).astype(np.float32)
        bias = rng.normal(0, 0.1, cout).astype(np.float32)

        def fn(x):
            return tf.nn.relu(tf.nn.conv2d(x, tf.constant(kernel), 1, "SAME") + bias)

    shape = [1, h, h, cin]
    spec = tf.TensorSpec(shape, tf.float32, name="x")
    concrete = tf.function(fn, input_signature=[spec]).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf.Module())
    if quantization != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [rng.normal(0, 1, shape).astype(np.float32)] for _ in range(4)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.int8
        converter._experimental_disable_per_channel = quantization == "int8 per-tensor"
    return converter.convert()


def profile_convs(threads: int, iters: int) -> None:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    def ms(data, resolver=OpResolverType.AUTO):
        interpreter = Interpreter(
            model_content=data, num_threads=threads, experimental_op_resolver_type=resolver
        )
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        return _time(interpreter, iters) * 1e3

    print(
        "| conv | MMAC | float32 | int8 | int8 per-tensor | float32 / int8 | "
        "TFLite kernels: float32 | int8 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    builtin = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    for name, h, cin, cout, k, depthwise in CONVS:
        files = {
            q: _conv_file(h, cin, cout, k, depthwise, q)
            for q in ("float32", "int8", "int8 per-tensor")
        }
        f32, i8, i8t = (ms(files[q]) for q in files)
        ref_f32, ref_i8 = ms(files["float32"], builtin), ms(files["int8"], builtin)
        macs = h * h * cout * k * k * (1 if depthwise else cin) / 1e6
        print(
            f"| {name} | {macs:.1f} | {f32:.3f} ms | {i8:.3f} ms | {i8t:.3f} ms | "
            f"{f32 / i8:.2f}x | {ref_f32:.3f} ms | {ref_i8:.3f} ms |",
            flush=True,
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["ops", "convs"])
    parser.add_argument("files", nargs="*")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    if args.mode == "convs":
        profile_convs(args.threads, args.iters)
        return
    if not args.files:
        parser.error("ops needs at least one .tflite file")
    for path in args.files:
        profile_ops(path, args.threads, args.iters, args.top)


if __name__ == "__main__":
    main()
