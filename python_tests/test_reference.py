"""The reference reproduces the published network's structure, layouts and quirks (SPEC)."""
import torch

from sficonv_ext import reference


def test_wrapper_layout_entry_and_parameter_counts():
    model = reference.PublishedTrainingWrapper(26)
    sd = model.state_dict()
    assert len(sd) == 363
    assert sum(p.numel() for p in model.parameters()) == 13_953_538


def test_published_key_names_and_shapes():
    sd = reference.PublishedTrainingWrapper(26).state_dict()
    bare = reference.sfi_resnet26().state_dict()
    assert sd["rgb_extract_feature.0.weight"].shape == (64, 3, 7, 7)
    assert "rgb_extract_feature.4.0.SFIC1.conv.MCSConv.const_weight" in sd
    assert sd["fc.weight"].shape == (2, 2048)
    assert bare["layer1.0.SFIC2.conv.s2s.weight"].shape == (32, 32, 3, 3)
    assert bare["layer1.0.SFIC3.conv.f2s.weight"].shape == (128, 32, 1, 1)
    for key in ("layer1.0.SFIC1.conv.s2s.weight", "layer1.0.SFIC1.conv.MCSConv.weight",
                "layer1.0.SFIC1.bn_f.running_var", "layer2.0.downsample.0.conv.f2s.weight",
                "layer4.0.SFIC3.conv.f2f.weight", "layer4.1.conv2.weight"):
        assert key in bare, key


def test_mcs_published_quirks():
    mcs = reference.MCSConv(16)
    w = mcs.weight
    assert not w.requires_grad and mcs.const_weight.requires_grad
    assert w.data_ptr() == mcs.const_weight.data_ptr()  # shared storage
    assert torch.all(w[:, 0, 2, 2] == -1)
    off_centre = w.sum(dim=(1, 2, 3)) + 1
    torch.testing.assert_close(off_centre, torch.ones(16), rtol=0, atol=1e-4)
    out = mcs(torch.randn(2, 16, 9, 9, requires_grad=True))
    out.sum().backward()
    assert mcs.const_weight.grad is None and mcs.bias.grad is None


def test_constraint_matches_spec_definition():
    w = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    w[1] = 0  # S_c = 0 counts as positive: clamped to +eps
    eff = reference.constrain_mcs_weight(w, eps=1e-3)
    assert torch.all(eff[:, 0, 2, 2] == -1)
    for c in (0, 2, 3):
        s = w[c].sum() - w[c, 0, 2, 2]
        expect = w[c] / s if s.abs() >= 1e-3 else w[c] / (1e-3 if s >= 0 else -1e-3)
        expect[0, 2, 2] = -1
        torch.testing.assert_close(eff[c], expect)
    assert torch.all(eff[1].flatten()[[i for i in range(25) if i != 12]] == 0)


def test_first_block_residual_is_sfic1_output():
    # The published quirk: layer1.0's downsample reads SFIC1's 64-channel output, not the input.
    block = reference.PublishedTrainingWrapper(26).rgb_extract_feature[4][0]
    assert block.downsample[0].conv.s2s.in_channels == 32
    assert block.downsample[0].conv.f2f.in_channels == 32


def test_forward_shapes_all_depths():
    for depth in (26, 50):
        out = reference.PublishedTrainingWrapper(depth)(torch.randn(2, 3, 64, 64))
        assert out.shape == (2, 2)


def test_constraint_ignores_a_non_finite_centre_tap():
    # The centre is replaced by -1, never read: an inf there once made the channel NaN (inf * 0).
    w = torch.rand(2, 1, 5, 5, dtype=torch.float64) + 0.5
    w[0, 0, 2, 2] = float("inf")
    w[1, 0, 2, 2] = float("nan")
    c = reference.constrain_mcs_weight(w)
    finite = w.clone()
    finite[:, 0, 2, 2] = 7.0
    assert torch.equal(c, reference.constrain_mcs_weight(finite))


def test_constraint_gradient_passes_through_a_sum_exactly_at_eps():
    # |S| == eps is outside the clamp, as the kernels' comparisons have it (csrc clamp_sum,
    # mcs_torch.constraint_backward): the gradient flows through S there. torch.clamp's own
    # gradient at its bound is 0 in torch 2.14, which made the reference disagree at exactly +-eps.
    from sficonv_ext.ops.mcs_torch import constraint_backward
    eps = 0.25
    for s in (eps, -eps):
        w = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
        w[0, 0, 0, 0], w[0, 0, 2, 2] = 1.0 + s, -1.0  # off-centre sum exactly s
        w[0, 0, 1, 2] = 0.5
        w[0, 0, 2, 1] = -0.5
        w.requires_grad_()
        g = torch.randn(1, 1, 3, 3, dtype=torch.float64)
        (reference.constrain_mcs_weight(w, eps) * g).sum().backward()
        want = constraint_backward(g.reshape(1, 9), w.detach(), True, eps)
        assert torch.allclose(w.grad, want, rtol=1e-12, atol=1e-12), s
