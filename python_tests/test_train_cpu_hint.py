"""A float32 CPU run on a CPU with AMX bfloat16 units is told about --amp bf16, once."""
import torch

from sficonv_ext.train import cpu_features
from sficonv_ext.train.cli import main
from test_train_support import FAST, tiny_builtin


def test_amx_flag_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu avx512f amx_bf16 amx_tile\n")
    assert cpu_features.has_amx_bf16(str(info))
    info.write_text("processor : 0\nflags : fpu avx512f avx512_bf16 amx_bf16x\n")
    assert not cpu_features.has_amx_bf16(str(info))  # a whole flag, not a prefix
    assert not cpu_features.has_amx_bf16(str(tmp_path / "missing"))


def test_hint_only_for_float32_cpu_runs_with_amx(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(cpu_features, "has_amx_bf16", lambda: True)
    assert "--amp bf16" in cpu_features.amp_hint("none", cpu)
    assert cpu_features.amp_hint("bf16", cpu) is None
    assert cpu_features.amp_hint("fp16", cpu) is None
    assert cpu_features.amp_hint("none", torch.device("cuda")) is None
    monkeypatch.setattr(cpu_features, "has_amx_bf16", lambda: False)
    assert cpu_features.amp_hint("none", cpu) is None


def test_a_training_run_logs_the_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_features, "has_amx_bf16", lambda: True)
    out = tmp_path / "run"
    assert main(["train", *tiny_builtin(tmp_path, images=16), *FAST, "--out", str(out)]) == 0
    assert (out / "train.log").read_text().count("note: this CPU has AMX bfloat16 units") == 1
