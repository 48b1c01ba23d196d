"""What a new user's console shows: our first line at once, no TensorFlow C++ start-up logs
unless asked for."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A TensorFlow C++ log line: "2026-12-06 15:01:40.015499: I external/.../file.cc:31] ..."
TF_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] \S+:\d+\]", re.M)


def _run(*args, **env):
    base = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    base.update(env, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=base, cwd=ROOT, timeout=300)


def test_importing_the_package_does_not_load_tensorflow():
    code = (
        "import sys, spinenet_tf, spinenet_tf.console; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow loaded'; "
        "print(spinenet_tf.__version__, 'build_backbone' in dir(spinenet_tf))"
    )
    out = _run("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1] == "True"


def test_commands_start_with_our_line_and_keep_tensorflow_logs_out():
    quiet = _run("-m", "spinenet_tf.train", "--helpfull")
    # absl prints the help and exits with 1
    assert quiet.stderr.startswith("spinenet_tf train: starting")
    assert "--[no]verbose" in quiet.stdout
    for noise in ("oneDNN", "cuda", "cpu_feature_guard", "absl::InitializeLog"):
        assert noise not in quiet.stderr, quiet.stderr
    assert not TF_LOG_LINE.search(quiet.stderr), quiet.stderr
    verbose = _run("-m", "spinenet_tf.train", "--helpfull", SPINENET_TF_VERBOSE="1")
    # The switch really is what hides them. Which lines TensorFlow logs depends on the CPU
    # (oneDNN's notice only on Intel; the CUDA probe everywhere), so look for its format.
    assert TF_LOG_LINE.search(verbose.stderr), verbose.stderr
