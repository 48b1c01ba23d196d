"""The commands' console: TensorFlow's C++ logging off unless asked for, and our first line
before TensorFlow loads. Imports nothing heavy (absl flags only): call `quiet_tensorflow`
before TensorFlow is imported (the package's own __init__ does not import it)."""

from __future__ import annotations

import os
import sys

from absl import flags

# Set to 1 to keep TensorFlow's C++ logs (CUDA probing, oneDNN, tf.data end-of-sequence).
VERBOSE_ENV = "SPINENET_TF_VERBOSE"


def verbose(argv: list[str] | None = None) -> bool:
    """True when --verbose is on the command line or SPINENET_TF_VERBOSE is set (not 0)."""
    argv = sys.argv if argv is None else argv
    flag = any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv)
    return flag or os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


def quiet_tensorflow(command: str, argv: list[str] | None = None) -> None:
    """Defines the command's --verbose flag, prints its first line at once and, unless
    verbose, sets TensorFlow's C++
    log level to errors-only-fatal (3) for the process. Without it a new user's console
    opens with lines of CUDA probing and oneDNN notices on a CPU machine, and every
    evaluation ends with the input pipeline's end-of-sequence warnings. An explicit
    TF_CPP_MIN_LOG_LEVEL is respected."""
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, f"Keep TensorFlow's C++ logs (also: {VERBOSE_ENV}=1).")
    print(f"spinenet_tf {command}: starting (loading TensorFlow) ...", file=sys.stderr, flush=True)
    if "tensorflow" in sys.modules or verbose(argv):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
