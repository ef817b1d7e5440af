"""The scripts in training/ run the sficonv commands from a checkout, and its configs stay valid."""
import json
import os
import re
import subprocess
import sys

import pytest

from sficonv_ext.train.config import read_yaml
from test_train_support import FAST, tiny_builtin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING = os.path.join(ROOT, "training")
SCRIPTS = {"train.py": "train", "evaluate.py": "eval", "predict.py": "predict",
           "export.py": "export"}
# What each command requires, so that the unknown option is what it refuses.
REQUIRED = {"predict.py": ["image.png"], "export.py": ["--checkpoint", "c.pt", "--out", "o.pkl"]}


def run_script(name, *args, env=None):
    full_env = dict(os.environ, OMP_NUM_THREADS="2", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(TRAINING, name), *args],
                          capture_output=True, text=True, timeout=600, env=full_env)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_script_is_its_command(script):
    done = run_script(script, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: sficonv {SCRIPTS[script]} ")
    refused = run_script(script, *REQUIRED.get(script, []), "--no-such-option")
    assert refused.returncode == 2
    assert (f"sficonv {SCRIPTS[script]}: error: unrecognized arguments: --no-such-option"
            in refused.stderr)


def test_train_then_evaluate_by_path(tmp_path):
    data = tiny_builtin(tmp_path, images=16)
    run = tmp_path / "run"
    trained = run_script("train.py", *data, *FAST, "--out", str(run))
    assert trained.returncode == 0, trained.stderr
    assert (run / "best.pt").is_file()
    scored = run_script("evaluate.py", "--checkpoint", str(run / "best.pt"), *data,
                        "--out", str(tmp_path / "eval"), "--no-progress")
    assert scored.returncode == 0, scored.stderr
    with open(tmp_path / "eval" / "metrics.json") as f:
        assert json.load(f)["n"] > 0


def test_a_missing_package_is_explained(tmp_path):
    broken = tmp_path / "sficonv_ext"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('simulated: no build here')\n")
    done = run_script("train.py", "--help", env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.startswith("training/train.py: error: ")
    assert "not importable (simulated: no build here)" in done.stderr
    assert "pip install -e . --no-build-isolation" in done.stderr


CONFIGS = sorted(f for f in os.listdir(os.path.join(TRAINING, "configs")) if f.endswith(".yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid_and_its_example_names_it(name):
    path = os.path.join(TRAINING, "configs", name)
    assert read_yaml(path, "train")  # raises on an unknown option or a bad value
    with open(path) as f:
        examples = re.findall(r"--config (\S+)", f.read())
    assert examples and all(os.path.join(ROOT, e) == path for e in examples)
