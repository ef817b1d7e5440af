"""Checkpoint interop: both published layouts load strictly, round trips are exact, and every
mismatch raises an error that names the offending keys."""
import pytest
import torch

from sficonv_ext import models, reference
from sficonv_ext.models.interop import load_official


def _assert_same(sd_a, sd_b):
    assert set(sd_a) == set(sd_b)
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


@pytest.mark.parametrize("layout", models.LAYOUTS)
def test_published_code_loads_export_strictly(layout):
    fast = models.sfi_resnet26(num_classes=2)
    exported = models.to_official_state_dict(fast, layout)
    ref = (reference.PublishedTrainingWrapper(26) if layout == "wrapper"
           else reference.sfi_resnet26())
    ref.load_state_dict(exported, strict=True)
    ref_sd = ref.state_dict()
    for k, v in exported.items():
        assert v.shape == ref_sd[k].shape, k


@pytest.mark.parametrize("layout", models.LAYOUTS)
def test_round_trip_through_published_layout_is_exact(layout):
    ref = (reference.PublishedTrainingWrapper(26) if layout == "wrapper"
           else reference.sfi_resnet26())
    published = ref.state_dict()
    fast = models.sfi_resnet26()
    fast.load_state_dict(published)
    _assert_same(models.to_official_state_dict(fast, layout), published)
    # And the fast model's own layout round-trips too.
    again = models.sfi_resnet26()
    again.load_state_dict(fast.state_dict())
    _assert_same(again.state_dict(), fast.state_dict())


def test_detect_layout():
    assert models.detect_layout(reference.PublishedTrainingWrapper(26).state_dict()) == "wrapper"
    assert models.detect_layout(reference.sfi_resnet26().state_dict()) == "bare"
    assert models.detect_layout(models.sfi_resnet26().state_dict()) == "own"


def test_learnable_export_carries_the_constrained_filter():
    fast = models.sfi_resnet26(mcs_learnable=True, mcs_init="stable")
    with torch.no_grad():
        fast.layer1[0].SFIC1.conv.mcs.weight.mul_(3.0)  # raw weight, no longer normalised
    exported = models.to_official_state_dict(fast, "bare")
    eff = fast.layer1[0].SFIC1.conv.mcs.effective_weight()
    torch.testing.assert_close(exported["layer1.0.SFIC1.conv.MCSConv.weight"], eff)
    torch.testing.assert_close(exported["layer1.0.SFIC1.conv.MCSConv.const_weight"], eff)
    # The published model then computes what the fast model computes.
    ref = reference.sfi_resnet26()
    ref.load_state_dict(exported)
    x = torch.randn(1, 3, 64, 64)
    ref.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-4)


def test_wrong_depth_names_keys_and_depth():
    published_50 = reference.PublishedTrainingWrapper(50).state_dict()
    with pytest.raises(RuntimeError) as info:
        models.sfi_resnet26().load_state_dict(published_50)
    msg = str(info.value)
    assert "unexpected keys" in msg and "rgb_extract_feature.4.2." in msg
    assert "SFIConv-ResNet-50" in msg


def test_missing_and_extra_keys_are_named():
    sd = reference.sfi_resnet26().state_dict()
    sd.pop("layer2.0.SFIC2.conv.f2s.weight")
    sd["layer2.0.SFIC2.conv.bogus.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as info:
        models.sfi_resnet26().load_state_dict(sd)
    msg = str(info.value)
    assert "layer2.0.SFIC2.conv.f2s.weight" in msg and "layer2.0.SFIC2.conv.bogus.weight" in msg


def test_wrong_shape_is_named():
    sd = reference.PublishedTrainingWrapper(26, num_classes=3).state_dict()
    with pytest.raises(RuntimeError,
                       match=r"fc\.weight: checkpoint \[3, 2048\], model \[2, 2048\]"):
        models.sfi_resnet26(num_classes=2).load_state_dict(sd)


def test_own_layout_mismatch_is_named():
    sd = models.sfi_resnet26().state_dict()
    sd.pop("layer3.1.SFIC2.conv.weight")
    with pytest.raises(RuntimeError, match=r"layer3\.1\.SFIC2\.conv\.weight"):
        models.sfi_resnet26().load_state_dict(sd)


def test_non_strict_load_reports_published_names():
    sd = reference.sfi_resnet26().state_dict()
    sd.pop("fc.bias")
    fast = models.sfi_resnet26()
    result = fast.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["fc.bias"] and result.unexpected_keys == []
    torch.testing.assert_close(fast.conv1.weight, sd["conv1.weight"])


def test_bad_layout_name():
    with pytest.raises(ValueError, match="layout"):
        models.to_official_state_dict(models.sfi_resnet26(), "mainnet")


def test_non_strict_load_fills_the_parts_present_of_a_fused_tensor():
    # One published block of a fused weight (or half of a BatchNorm pair) missing: the others
    # load, and the missing region keeps the model's current values, as torch keeps a
    # missing tensor.
    ref = reference.sfi_resnet26()
    sd = ref.state_dict()
    sd.pop("layer2.0.SFIC2.conv.f2s.weight")
    sd.pop("layer1.0.SFIC1.bn_f.running_var")
    fast = models.sfi_resnet26()
    before = fast.layer2[0].SFIC2.conv.weight.detach().clone()
    result = fast.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["layer1.0.SFIC1.bn_f.running_var",
                                           "layer2.0.SFIC2.conv.f2s.weight"]
    conv = fast.layer2[0].SFIC2.conv
    o, i = conv.out_spatial, conv.in_spatial
    torch.testing.assert_close(conv.weight[:o, :i], sd["layer2.0.SFIC2.conv.s2s.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(conv.weight[o:, :i], sd["layer2.0.SFIC2.conv.s2f.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(conv.weight[o:, i:], sd["layer2.0.SFIC2.conv.f2f.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(conv.weight[:o, i:], before[:o, i:], rtol=0, atol=0)
    bn = fast.layer1[0].SFIC1.bn
    torch.testing.assert_close(bn.running_var[:bn.spatial], sd["layer1.0.SFIC1.bn_s.running_var"],
                               rtol=0, atol=0)


def test_assign_keeps_the_models_memory_format():
    fast = models.sfi_resnet26()
    sd = reference.PublishedTrainingWrapper(26).state_dict()
    fast.load_state_dict(sd, assign=True)
    assert fast.layer1[0].SFIC2.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_data_parallel_prefix_and_whole_checkpoints_are_named():
    fast = models.sfi_resnet26()
    for sd in (fast.state_dict(), reference.PublishedTrainingWrapper(26).state_dict()):
        prefixed = {f"module.{k}": v for k, v in sd.items()}
        for strict in (True, False):
            with pytest.raises(RuntimeError, match="starts with 'module.'"):
                fast.load_state_dict(prefixed, strict=strict)
    whole = {"epoch": 3, "optimizer": {"state": {}}, "state_dict": fast.state_dict()}
    with pytest.raises(TypeError, match=r"checkpoint\['state_dict'\]"):
        fast.load_state_dict(whole, strict=False)  # would otherwise load nothing
    # A wrapper whose own keys start with 'module.' loads its own state_dict.
    wrapped = torch.nn.DataParallel(models.sfi_resnet26())
    load_official(wrapped, wrapped.state_dict())


def test_wrong_depth_hint_gives_the_builder_and_the_cli_flag():
    with pytest.raises(RuntimeError, match=r"sfi_resnet50 \(on the command line: --arch "
                                           r"sfi_resnet50\)"):
        models.sfi_resnet26().load_state_dict(reference.sfi_resnet50().state_dict())


def test_a_raw_learnable_filter_is_refused_by_a_frozen_model():
    # The raw weight of a learnable MCSConv has the frozen filter's key: loaded as it is, the
    # frozen model would compute with an unconstrained filter.
    learnable = models.sfi_resnet26(mcs_learnable=True, mcs_init="stable")
    with torch.no_grad():
        learnable.layer1[0].SFIC1.conv.mcs.weight.mul_(1.05)  # off-centre sums 1.05
    frozen = models.sfi_resnet26()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    with pytest.raises(RuntimeError, match="nothing was loaded.*mcs_learnable=True"):
        frozen.load_state_dict(learnable.state_dict())
    # Refused before anything is copied (PyTorch copies every other tensor before it raises).
    _assert_same(frozen.state_dict(), before)
    with pytest.raises(RuntimeError, match="mcs_learnable=True") as refused:
        frozen.load_state_dict(learnable.state_dict(), strict=False)
    assert "Missing key" not in str(refused.value)
    models.sfi_resnet26(mcs_learnable=True).load_state_dict(learnable.state_dict())
    # A constrained filter stored in another dtype, or rounded to one and back, still loads.
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        frozen = models.sfi_resnet26().to(dtype)
        models.sfi_resnet26().load_state_dict(frozen.state_dict())
        models.sfi_resnet26().load_state_dict(frozen.float().state_dict())


def test_export_warns_when_a_learnable_sum_was_clamped():
    fast = models.sfi_resnet26(mcs_learnable=True, mcs_init="stable")
    mcs = fast.layer1[0].SFIC1.conv.mcs
    with torch.no_grad():
        mcs.weight[0].mul_(1e-8)  # off-centre sum 1e-8 < eps: clamped
        mcs.weight[0, 0, 2, 2] = -1
    with pytest.warns(UserWarning, match=r"channels \[0\]"):
        models.to_official_state_dict(fast, "bare")


def test_sync_batchnorm_model_exports_and_loads_the_published_layout():
    fast = torch.nn.SyncBatchNorm.convert_sync_batchnorm(models.sfi_resnet26())
    exported = models.to_official_state_dict(fast, "wrapper")
    assert set(exported) == set(reference.PublishedTrainingWrapper(26).state_dict())
    reference.PublishedTrainingWrapper(26).load_state_dict(exported)
    fast.load_state_dict(exported)


def test_a_strict_own_layout_mismatch_loads_nothing():
    # nn.Module.load_state_dict copies every matching entry before it raises; the model would
    # be left half loaded.
    source = models.sfi_resnet26()
    state = source.state_dict()
    state.pop("fc.bias")
    target = models.sfi_resnet26()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"nothing was loaded\): missing keys: fc\.bias\."):
        target.load_state_dict(state)
    state = source.state_dict()
    state["fc.weight"] = torch.zeros(3, 2048)
    with pytest.raises(RuntimeError, match=r"shape mismatch for fc\.weight: checkpoint "
                                           r"\[3, 2048\], model \[2, 2048\]"):
        target.load_state_dict(state, strict=False)
    _assert_same(target.state_dict(), before)


def test_a_fused_model_refuses_an_unfused_checkpoint_and_keeps_its_weights():
    torch.manual_seed(0)
    unfused = models.sfi_resnet26().eval()
    with torch.no_grad():
        for module in unfused.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 1.5)
                module.running_mean.normal_()
    fused = models.fuse_for_inference(unfused)
    x = torch.randn(2, 3, 64, 64)
    expected = fused(x)
    wrapped = {"network." + k: v for k, v in unfused.state_dict().items()}
    for load, state in ((fused.network.load_state_dict, unfused.state_dict()),
                        (fused.load_state_dict, wrapped)):
        for strict in (True, False):
            # strict=False used to load the unfolded weights under the folded biases, silently.
            with pytest.raises(ValueError, match="fused for inference .* BatchNorm entries"):
                load(state, strict=strict)
    assert torch.equal(fused(x), expected)
    # A fused model's own state_dict loads into another fused model, with or without the
    # wrapper's "network." prefix.
    for state in (fused.state_dict(), fused.network.state_dict()):
        other = models.fuse_for_inference(models.sfi_resnet26().eval())
        other.load_state_dict(state)
        assert torch.equal(other(x), expected)


def test_a_checkpoint_of_a_fused_model_is_refused_by_an_unfused_one():
    fused = models.fuse_for_inference(models.sfi_resnet26().eval())
    target = models.sfi_resnet26()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for strict in (True, False):
        # strict=False used to load the folded weights under the untouched BatchNorms.
        with pytest.raises(ValueError, match="fused for inference .* no BatchNorm statistics"):
            target.load_state_dict(fused.network.state_dict(), strict=strict)
    _assert_same(target.state_dict(), before)


def test_a_missing_num_batches_tracked_is_filled_in_only_for_old_checkpoints():
    state = models.sfi_resnet26().state_dict()
    state.pop("bn1.num_batches_tracked")
    target = models.sfi_resnet26()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    # Saved by a torch that has the entry (metadata version 2): a missing key, nothing loaded.
    with pytest.raises(RuntimeError, match="missing keys: bn1.num_batches_tracked"):
        target.load_state_dict(state)
    _assert_same(target.state_dict(), before)
    # Without metadata (as from before the entry existed) BatchNorm fills it in.
    target.load_state_dict(dict(state))


def test_a_fused_model_loads_its_state_dict_with_or_without_a_cuda_graph_wrapper():
    from sficonv_ext.models.cuda_graph import CUDAGraphInference
    torch.manual_seed(0)
    source = models.fuse_for_inference(models.sfi_resnet26().eval())
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    expected = source.network(x)
    target = models.fuse_for_inference(models.sfi_resnet26().eval())
    target.network = CUDAGraphInference(target.network)  # its keys: network.network.*
    for state in (source.state_dict(), source.network.state_dict(), target.state_dict()):
        target.load_state_dict(state)
        assert torch.equal(target.network.network(x), expected)
    with pytest.raises(TypeError, match="keys must be strings"):
        target.load_state_dict({0: torch.ones(1)})
