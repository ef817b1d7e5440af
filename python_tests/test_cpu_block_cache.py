"""``sficonv_ext.cpu_allocator.large_block_cache``: freed large CPU blocks are reused inside the
block and only there, tensors outlive it intact, results do not change, and the page faults it
exists to avoid are gone (counted in a fresh process)."""
import subprocess
import sys
import textwrap

import pytest
import torch

from sficonv_ext.cpu_allocator import large_block_cache, large_block_cache_stats
from sficonv_ext.ops import _extension

pytestmark = pytest.mark.skipif(not _extension.has_cpp_kernels(),
                                reason="needs the compiled extension")

MIB = 1 << 20


def _counts():
    stats = large_block_cache_stats()
    return stats["hits"], stats["misses"]


def test_a_freed_block_is_handed_out_again_inside_only():
    with large_block_cache():
        first = torch.empty(MIB)  # 4 MiB
        address = first.data_ptr()
        del first
        hits, _ = _counts()
        second = torch.empty(MIB)
        assert second.data_ptr() == address
        assert _counts()[0] == hits + 1
        assert large_block_cache_stats()["on"]
    stats = large_block_cache_stats()
    assert not stats["on"] and stats["cached_bytes"] == 0
    before = _counts()
    outside = torch.empty(MIB)
    del outside
    assert _counts() == before  # torch's own allocator again
    del second


def test_sizes_within_a_sixteenth_share_a_block_and_small_requests_pass_by():
    with large_block_cache(min_bytes=2 * MIB):
        block = torch.empty(4 * MIB, dtype=torch.uint8)
        address = block.data_ptr()
        del block
        near = torch.empty(4 * MIB - 100_000, dtype=torch.uint8)  # same size class
        assert near.data_ptr() == address
        before = _counts()
        small = torch.empty(MIB, dtype=torch.uint8)  # below min_bytes
        del small
        assert _counts() == before
        del near


def test_tensors_made_inside_keep_their_values_after_the_block():
    with large_block_cache():
        kept = torch.arange(3 * MIB, dtype=torch.float32)
        scratch = torch.ones(3 * MIB)
        del scratch
    assert large_block_cache_stats()["live_bytes"] >= kept.numel() * 4
    after = torch.full((3 * MIB,), 7.0)  # may reuse the freed scratch memory: must not alias
    assert torch.equal(kept, torch.arange(3 * MIB, dtype=torch.float32))
    assert torch.all(after == 7.0)


def test_nested_blocks_share_the_outer_cache():
    with large_block_cache():
        with large_block_cache():
            pass
        assert large_block_cache_stats()["on"]
    assert not large_block_cache_stats()["on"]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1M"])
def test_bad_min_bytes(bad):
    with pytest.raises(ValueError, match="min_bytes"):
        with large_block_cache(min_bytes=bad):
            pass
    assert not large_block_cache_stats()["on"]


def test_onednn_blocks_may_cross_the_block_boundary():
    # oneDNN tensors are allocated and freed through raw_allocate/raw_deallocate, which uses
    # whichever CPU allocator is current at free time.
    x = torch.randn(2, 64, 64, 64)
    outside = x.to_mkldnn()
    with large_block_cache():
        inside = x.to_mkldnn()
        del outside
    assert torch.equal(inside.to_dense(), x)
    del inside


def _train_step(seed):
    from sficonv_ext import models
    torch.manual_seed(seed)
    model = models.sfi_resnet26().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
    return loss.detach(), [p.detach().clone() for p in model.parameters()]


def test_training_inside_gives_the_same_numbers():
    loss, params = _train_step(0)
    with large_block_cache(min_bytes=64 << 10):
        hits = _counts()[0]
        cached_loss, cached_params = _train_step(0)
        assert _counts()[0] > hits  # the second step reused the first step's blocks
    assert torch.equal(loss, cached_loss)
    assert all(torch.equal(a, b) for a, b in zip(params, cached_params))


# Minor page faults per round of allocating, filling and freeing a 64 MiB tensor.
_FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    from sficonv_ext.cpu_allocator import large_block_cache
    def faults_per_round():
        for _ in range(2):
            torch.empty(16 * 2**20).fill_(1.0)
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.empty(16 * 2**20).fill_(1.0)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 5
    if sys.argv[1] == "cache":
        with large_block_cache():
            print(faults_per_round())
    else:
        print(faults_per_round())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux page faults")
def test_the_cache_removes_the_page_faults():
    def faults(mode):
        done = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                              text=True, check=True)
        return float(done.stdout.strip().splitlines()[-1])

    pages = 64 * MIB // 4096
    assert faults("cache") < pages / 20
    # glibc maps and unmaps a block this size every time (other C libraries may not).
    print("faults per round: default", faults("default"))
