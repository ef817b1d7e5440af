"""The CUDA kernel choices (SFICONV_CUDA_* environment variables) as the extension reads them.
Plain C++ in every build, so these run without a GPU: a misspelt or contradictory choice must be
an error, never a silent default."""
import pytest
import torch

from sficonv_ext import ops

pytestmark = pytest.mark.skipif(not ops.backends()["cpp"], reason="C++ extension not built")

NAMES = ("SFICONV_CUDA_NCHW_KERNEL", "SFICONV_CUDA_TILE_MIN_BLOCKS", "SFICONV_CUDA_FUSED_BACKWARD")


def config():
    text = torch.ops.sficonv_ext.cuda_kernel_config()
    return dict(item.split("=", 1) for item in text.split(";"))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    want = {"nchw_kernel": "tiles-pipelined", "tile_min_blocks": "1", "fused_backward": "0"}
    assert config() == want


def test_empty_values_mean_unset(monkeypatch):
    for name in NAMES:
        monkeypatch.setenv(name, "")
    assert config() == {"nchw_kernel": "tiles-pipelined", "tile_min_blocks": "1",
                        "fused_backward": "0"}


@pytest.mark.parametrize("name,value,key", [
    ("SFICONV_CUDA_NCHW_KERNEL", "tiles", "nchw_kernel"),
    ("SFICONV_CUDA_NCHW_KERNEL", "rows", "nchw_kernel"),
    ("SFICONV_CUDA_TILE_MIN_BLOCKS", "3", "tile_min_blocks"),
    ("SFICONV_CUDA_TILE_MIN_BLOCKS", "4", "tile_min_blocks"),
    ("SFICONV_CUDA_FUSED_BACKWARD", "1", "fused_backward"),
])
def test_each_choice_is_read(monkeypatch, name, value, key):
    monkeypatch.setenv(name, value)
    assert config()[key] == value


@pytest.mark.parametrize("name", NAMES)
def test_unknown_value_names_the_choices(monkeypatch, name):
    monkeypatch.setenv(name, "bogus")
    with pytest.raises(RuntimeError, match=f"{name}=bogus is not one of"):
        config()


def test_register_cap_with_explicit_pipelined_kernel_is_an_error(monkeypatch):
    # The cap builds only the plain tile kernel; alone it selects that kernel (no error).
    monkeypatch.setenv("SFICONV_CUDA_TILE_MIN_BLOCKS", "3")
    assert config()["tile_min_blocks"] == "3"
    monkeypatch.setenv("SFICONV_CUDA_NCHW_KERNEL", "tiles-pipelined")
    with pytest.raises(RuntimeError, match="TILE_MIN_BLOCKS=3 caps the plain tile kernel"):
        config()
    monkeypatch.setenv("SFICONV_CUDA_NCHW_KERNEL", "tiles")
    assert config() == {"nchw_kernel": "tiles", "tile_min_blocks": "3", "fused_backward": "0"}
    monkeypatch.setenv("SFICONV_CUDA_NCHW_KERNEL", "rows")  # the cap changes nothing there
    assert config()["nchw_kernel"] == "rows"
    # Without a cap, the double-buffered kernel may be named explicitly.
    monkeypatch.setenv("SFICONV_CUDA_TILE_MIN_BLOCKS", "1")
    monkeypatch.setenv("SFICONV_CUDA_NCHW_KERNEL", "tiles-pipelined")
    assert config() == {"nchw_kernel": "tiles-pipelined", "tile_min_blocks": "1",
                        "fused_backward": "0"}


@pytest.mark.skipif(not ops.backends()["cuda"], reason="CUDA kernels not built")
def test_backends_report_the_choices(monkeypatch):
    # python -m sficonv_ext.info shows them (and a bad value without raising itself).
    assert ops.backends()["cuda_kernels"] == torch.ops.sficonv_ext.cuda_kernel_config()
    monkeypatch.setenv("SFICONV_CUDA_NCHW_KERNEL", "bogus")
    assert ops.backends()["cuda_kernels"].startswith(
        "invalid: mcs_conv CUDA kernel: SFICONV_CUDA_NCHW_KERNEL=bogus")

