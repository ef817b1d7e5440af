"""The benchmark scripts run end to end on tiny settings and write complete JSON results (their
timings are not checked: speed is for the benchmark tables, not for tests)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _invoke(script, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=BENCH,
                          env=env, capture_output=True, text=True, timeout=600)


def _run(script, *args):
    done = _invoke(script, *args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def _run_failing(script, *args):
    done = _invoke(script, *args)
    assert done.returncode != 0, done.stdout[-2000:]
    return done.stderr


def test_bench_models_writes_every_variant(tmp_path):
    out = tmp_path / "models.json"
    variants = ["reference", "fast", "fast-cpp-epilogue", "plain", "fused-inference",
                "fused-inference-unpacked"]
    text = _run("bench_models.py", "--device", "cpu", "--batch", "2", "--size", "64",
                "--warmup", "0", "--iters", "1", "--rounds", "1", "--malloc", "no-mmap",
                "--variants", *variants, "--json", str(out))
    result = json.loads(out.read_text())
    assert result["complete"] and result["settings"]["malloc"] == "no-mmap"
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == variants
    for name, row in rows.items():
        assert row["infer_images_per_s"] > 0, name
        inference_only = name.startswith("fused-inference")
        assert (row.get("train_images_per_s", 0) > 0) == (not inference_only), name
    assert "fused-inference" in text
    assert "x ref: images/s relative to 'reference'" in text


def test_bench_mcs_backend_choice_and_its_errors(tmp_path):
    out = tmp_path / "mcs.json"
    _run("bench_mcs.py", "--device", "cpu", "--shapes", "2x4x9x11", "--iters", "1",
         "--warmup", "0", "--rounds", "1", "--layouts", "nchw", "--backends", "torch",
         "--json", str(out))
    assert {r["backend"] for r in json.loads(out.read_text())["rows"]} == {"torch"}
    assert "--cuda-graph needs a CUDA device" in _run_failing(
        "bench_mcs.py", "--device", "cpu", "--cuda-graph", "--json", str(out))
    assert "not available here" in _run_failing(
        "bench_mcs.py", "--device", "cpu", "--backends", "no-such-backend", "--json", str(out))


def test_bench_models_runs_inside_the_block_cache(tmp_path):
    from sficonv_ext.ops import _extension
    if not _extension.has_cpp_kernels():
        pytest.skip("--malloc cache needs the compiled extension")
    out = tmp_path / "models.json"
    _run("bench_models.py", "--device", "cpu", "--batch", "2", "--size", "64", "--warmup", "0",
         "--iters", "1", "--rounds", "1", "--malloc", "cache", "--variants", "reference",
         "fast", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["complete"] and result["settings"]["malloc"] == "cache"
    assert all(r["train_images_per_s"] > 0 for r in result["rows"])


def test_bench_mcs_writes_every_backend(tmp_path):
    out = tmp_path / "mcs.json"
    _run("bench_mcs.py", "--device", "cpu", "--shapes", "2x4x9x11", "--iters", "1",
         "--warmup", "0", "--rounds", "2", "--malloc", "no-mmap", "--json", str(out))
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["complete"] and result["settings"]["malloc"] == "no-mmap"
    # Where the numbers came from: the code, the load, the kernels "auto" had.
    machine = result["machine"]
    assert {"git_commit", "load_average_1min", "backends"} <= set(machine)
    assert all(len(r["round_ms"]) == 2 for r in rows if r["phase"] != "forward_backward")
    backends = {r["backend"] for r in rows}
    assert "torch" in backends
    assert {(r["layout"], r["phase"]) for r in rows} == {
        (layout, phase) for layout in ("nchw", "channels_last")
        for phase in ("forward", "backward_x", "backward_xw", "forward_backward")}
    assert all(r["ms"] > 0 and r["speedup_vs_torch"] > 0 for r in rows)
    by_key = {(r["backend"], r["layout"], r["phase"]): r["ms"] for r in rows}
    for backend, layout, phase in list(by_key):  # the training figure is the sum of its parts
        if phase == "forward_backward":
            parts = by_key[backend, layout, "forward"] + by_key[backend, layout, "backward_xw"]
            assert abs(by_key[backend, layout, phase] - parts) < 1e-9


def test_bench_fused_layers_on_the_cpu_times_every_path(tmp_path):
    from sficonv_ext import ops
    out = tmp_path / "layers.json"
    _run("bench_fused_layers.py", "--device", "cpu", "--shape", "2x4x9x11",
         "--norm-shape", "2x6x5x7", "--out-channels", "4", "--iters", "1", "--warmup", "0",
         "--malloc", "no-mmap", "--rounds", "2", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    epilogue = {"torch", "cpp"} if ops.backends()["cpp"] else {"torch"}
    assert {(r["layer"].split()[0], r["path"]) for r in rows} == (
        {("first", "composed"), ("first", "plain-conv")} | {("bn+add+relu", p) for p in epilogue})
    assert {r["phase"] for r in rows} == {"forward", "forward_backward"}
    assert all(r["ms"] > 0 and r["speedup"] > 0 for r in rows)


def test_bench_conv3x3_times_both_paths(tmp_path):
    from sficonv_ext import ops
    if not ops.backends()["cpp"]:
        pytest.skip("the C++ extension is not built")
    out = tmp_path / "conv3x3.json"
    _run("bench_conv3x3.py", "--shapes", "2x5x9x11", "1x3x8x8", "--iters", "1", "--warmup",
         "0", "--rounds", "2", "--malloc", "no-mmap", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {(r["shape"], r["path"], r["phase"]) for r in rows} == {
        (s, p, ph) for s in ("2x5x9x11", "1x3x8x8") for p in ("torch", "winograd")
        for ph in ("forward", "forward_backward")}
    assert all(r["ms"] > 0 and r["speedup"] > 0 for r in rows)


def test_bench_conv1x1_times_both_paths(tmp_path):
    out = tmp_path / "conv1x1.json"
    _run("bench_conv1x1.py", "--shapes", "2x5x9x11:7", "1x3x8x8:4", "--iters", "1", "--warmup",
         "0", "--rounds", "2", "--malloc", "no-mmap", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {(r["shape"], r["path"], r["phase"]) for r in rows} == {
        (s, p, ph) for s in ("2x5x9x11:7", "1x3x8x8:4") for p in ("torch", "gemm")
        for ph in ("forward", "forward_backward")}
    assert all(r["ms"] > 0 and r["speedup"] > 0 for r in rows)


def test_bench_conv1x1_names_a_bad_shape():
    assert "NxCxHxW:K" in _run_failing("bench_conv1x1.py", "--shapes", "8x512x8x8")


def test_ab_train_step_times_each_variant_in_turn():
    out = _run("ab_train_step.py", "--variants", "fast", "fast-torch-pointwise", "--rounds", "1",
               "--steps", "1", "--batch", "1", "--size", "64")
    rows = [line.split() for line in out.splitlines()[-2:]]
    assert [r[0] for r in rows] == ["fast", "fast-torch-pointwise"]
    assert all(float(v) > 0 for r in rows for v in r[1:])
    assert "two or more variants" in _run_failing("ab_train_step.py", "--variants", "fast")


def test_profile_driver_runs_every_phase_or_says_it_needs_a_gpu():
    import torch
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(BENCH, "profile_mcs_kernels.py"),
                           "--shape", "2x4x9x11"], cwd=BENCH, env=env, capture_output=True,
                          text=True, timeout=600)
    if not torch.cuda.is_available():
        assert done.returncode != 0 and "needs a CUDA device" in done.stderr
        return
    assert done.returncode == 0, done.stderr[-3000:]
    phases = [line for line in done.stdout.splitlines() if line.startswith("== phase")]
    assert len(phases) >= 4 and done.stdout.rstrip().endswith("== done")


def test_profile_inference_reports_each_variant_on_the_cpu():
    text = _run("profile_inference.py", "--device", "cpu", "--batch", "1", "--size", "64",
                "--dtype", "float32", "--iters", "1", "--top", "2", "--variants", "fast",
                "fused-inference", "fused-inference-cudnn")
    assert "profile fast:" in text and "operators per forward" in text
    assert "mkldnn" in text  # the fused model's oneDNN calls are named among the top ones
    assert "profile fused-inference-cudnn: not built" in text  # CUDA only, said so


def test_train_step_profile_sums_operators_into_kinds():
    text = _run("profile_train_step.py", "--variants", "fast", "plain", "--batch", "2",
                "--size", "64", "--iters", "1")
    for name in ("fast", "plain"):
        line = next(l for l in text.splitlines() if l.startswith(f"{name}: "))
        assert "GFLOP" in line and "ms a step" in line
        assert "page faults" in line and "of system CPU time" in line  # the untimed steps
    assert "convolution backward" in text and "convolution forward" in text
    assert "MCSConv" in text  # the fast model's first layer; the plain twin has none
    text = _run("profile_train_step.py", "--variants", "fast", "--batch", "2", "--size", "64",
                "--iters", "1", "--dtype", "bfloat16", "--top", "100")
    assert ", bfloat16, cpu," in text.splitlines()[0]
    assert "aten._to_copy" in text  # autocast's casts of the float32 weights


def test_a_loaded_machine_is_named_in_the_output(monkeypatch, capsys):
    monkeypatch.syspath_prepend(BENCH)
    import bench_common
    monkeypatch.setattr(bench_common.os, "getloadavg", lambda: (64.0, 1.0, 1.0))
    assert bench_common.warn_if_loaded() == 64.0
    assert "not comparable" in capsys.readouterr().out
    monkeypatch.setattr(bench_common.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    bench_common.warn_if_loaded()
    assert capsys.readouterr().out == ""
