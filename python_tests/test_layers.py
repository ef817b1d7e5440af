"""Fused layers vs the published layers, one at a time, in float64."""
import pytest
import torch
import torch.nn.functional as F

from sficonv_ext import models
from sficonv_ext import nn as sfi_nn
from sficonv_ext import reference
from sficonv_ext.models.interop import load_official

from conftest import rel_err

TOL = 1e-10


def _split(y, spatial):
    return y[:, :spatial], y[:, spatial:]


def _randomise_bn(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)


# Odd input channels are fine; the published BatchNorm pair breaks on odd OUTPUT channels
# (bn_s gets int(C/2) channels but the spatial branch has C - int(C/2)), so those are not compared.
@pytest.mark.parametrize("cin,cout,k,stride", [(7, 10, 3, 1), (8, 6, 1, 2), (5, 12, 3, 2),
                                               (64, 256, 1, 2), (256, 32, 1, 2)])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_sficonv_layer_parity(cin, cout, k, stride, relu, train):
    ref_cls = reference.SFIConvBR if relu else reference.SFIConvB
    ref = ref_cls(cin, cout, kernel_size=(k, k), stride=stride, padding=k // 2).double()
    _randomise_bn(ref)
    fast = sfi_nn.SFIConvNorm(sfi_nn.SFIConv2d(cin, cout, k, stride=stride), relu=relu).double()
    load_official(fast, ref.state_dict())
    ref.train(train), fast.train(train)
    x = torch.randn(3, cin, 13, 11, dtype=torch.float64, requires_grad=True)
    xs, xf = _split(x, reference.spatial_channels(cin, 0.5))
    ys, yf = ref((xs, xf))
    y = fast(x)
    out_s = reference.spatial_channels(cout, 0.5)
    assert rel_err(y[:, :out_s], ys) < TOL and rel_err(y[:, out_s:], yf) < TOL
    g = torch.randn_like(y)
    (gx_fast,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad((ys, yf), x, _split(g, out_s))
    assert rel_err(gx_fast, gx_ref) < TOL


@pytest.mark.parametrize("stride", [1, 2])
def test_last_sficonv_layer_parity(stride):
    ref = reference.LastSFIConvB(10, 24, kernel_size=(1, 1), stride=stride, padding=0).double()
    _randomise_bn(ref)
    fast = sfi_nn.SFIConvNorm(sfi_nn.SFIConv2d(10, 24, 1, stride=stride, merge_output=True),
                              relu=False).double()
    load_official(fast, ref.state_dict())
    x = torch.randn(2, 10, 9, 15, dtype=torch.float64)
    assert rel_err(fast(x), ref(_split(x, 5))) < TOL


@pytest.mark.parametrize("stride", [1, 2])
def test_first_sficonv_layer_parity(stride):
    ref = reference.FirstSFIConvBR(6, 10, kernel_size=(1, 1), stride=stride, padding=0).double()
    _randomise_bn(ref)
    fast = sfi_nn.SFIConvNorm(sfi_nn.FirstSFIConv2d(6, 10, 1, stride=stride), relu=True).double()
    load_official(fast, ref.state_dict())
    x = torch.randn(2, 6, 17, 10, dtype=torch.float64)
    ys, yf = ref(x)
    y = fast(x)
    assert rel_err(y[:, :5], ys) < TOL and rel_err(y[:, 5:], yf) < TOL


def test_mcs_module_loads_published_and_matches():
    ref = reference.MCSConv(5).double()
    fast = sfi_nn.MCSConv2d(5).double()
    load_official(fast, ref.state_dict())
    x = torch.randn(2, 5, 12, 7, dtype=torch.float64)
    assert rel_err(fast(x), ref(x)) < TOL
    assert torch.equal(fast.published_bias, ref.bias)


@pytest.mark.parametrize("init", sfi_nn.MCS_INITS)
def test_mcs_inits_satisfy_constraint_and_are_idempotent(init):
    mcs = sfi_nn.MCSConv2d(32, init=init, learnable=True).double()
    w = mcs.weight
    assert torch.all(w[:, 0, 2, 2] == -1)
    torch.testing.assert_close(w.sum(dim=(1, 2, 3)), torch.zeros(32, dtype=torch.float64),
                               atol=1e-4 * w.abs().max().item(), rtol=0)
    torch.testing.assert_close(mcs.effective_weight(), w, rtol=1e-5, atol=1e-5)
    if init == "stable":
        assert w.abs().max() <= 1


def test_learnable_constraint_gradcheck():
    w = torch.randn(3, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        return F.conv2d(x, reference.constrain_mcs_weight(w), padding=2, groups=3)
    assert torch.autograd.gradcheck(f, (x, w))


@pytest.mark.parametrize("cin,cout", [(8, 16), (64, 8)])
def test_pool_order_commutes(cin, cout):
    conv = sfi_nn.SFIConv2d(cin, cout, 1, stride=2).double()
    x = torch.randn(2, cin, 9, 7, dtype=torch.float64)
    pooled_first = F.conv2d(F.avg_pool2d(x, 2), conv.weight)
    pooled_last = F.avg_pool2d(F.conv2d(x, conv.weight), 2)
    assert rel_err(conv(x), pooled_first) < TOL and rel_err(pooled_last, pooled_first) < TOL
    assert conv.pool_first == sfi_nn.pool_before_pointwise(cin, cout)


def test_pool_order_rule():
    assert sfi_nn.pool_before_pointwise(256, 512)
    assert not sfi_nn.pool_before_pointwise(2048, 64)


def test_channels_last_and_non_contiguous_inputs():
    layer = sfi_nn.SFIConvNorm(sfi_nn.SFIConv2d(8, 12, 3, stride=2), relu=True).double().eval()
    x = torch.randn(2, 8, 15, 14, dtype=torch.float64)
    expect = layer(x)
    assert rel_err(layer(x.contiguous(memory_format=torch.channels_last)), expect) < TOL
    wide = torch.randn(2, 8, 15, 28, dtype=torch.float64)
    wide[..., ::2] = x
    assert rel_err(layer(wide[..., ::2]), expect) < TOL


def test_one_weight_parameter_per_layer():
    layer = sfi_nn.SFIConv2d(32, 64, 3)
    assert [n for n, _ in layer.named_parameters()] == ["weight"]
    first = sfi_nn.FirstSFIConv2d(64, 64, 1)
    assert [n for n, _ in first.named_parameters()] == ["weight", "mcs.weight"]


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="stride"):
        sfi_nn.SFIConv2d(8, 8, 3, stride=3)
    with pytest.raises(ValueError, match="odd"):
        sfi_nn.SFIConv2d(8, 8, 2)
    with pytest.raises(ValueError, match="odd"):
        sfi_nn.MCSConv2d(8, kernel_size=4)
    with pytest.raises(ValueError, match="init"):
        sfi_nn.MCSConv2d(8, init="zeros")


def test_hooks_on_batchnorms_keep_their_outputs_in_training():
    # The epilogue adds and applies ReLU in place on BatchNorm's fresh output, unless a hook
    # was handed it: a forward hook keeps it, a full backward hook hands on a view of it.
    model = models.sfi_resnet26().train()
    held = []
    bn = model.layer3[1].SFIC3.bn
    bn.register_forward_hook(lambda m, i, out: held.append((out, out.clone())))
    bn.register_full_backward_hook(lambda *_: None)
    model.maxpool.register_full_backward_hook(lambda *_: None)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    output, copy_at_hook = held[0]
    assert (copy_at_hook < 0).any() and torch.equal(output, copy_at_hook)


def test_frozen_batchnorms_take_a_batch_of_one_in_training_mode():
    # Fine-tuning with every BatchNorm frozen (.eval() inside a training model): no BatchNorm
    # uses batch statistics, so one small image is fine, as in the published network.
    model = models.sfi_resnet26().train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    assert model(torch.randn(1, 3, 40, 40)).shape == (1, 2)
    model.layer4[1].bn1.train()
    with pytest.raises(ValueError, match="more than one value per channel"):
        model(torch.randn(1, 3, 40, 40))


@pytest.mark.parametrize("channels_last", [False, True])
def test_learnable_mcs_module_applies_the_constraint_in_its_forward(channels_last):
    # MCSConv2d's own forward (the model goes through first_sfi_conv instead).
    mcs = sfi_nn.MCSConv2d(6, 5, learnable=True).double()
    with torch.no_grad():
        mcs.weight.copy_(torch.rand_like(mcs.weight) + 0.5)  # raw: off-centre sums far from 1
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    y = mcs(x)
    got, = torch.autograd.grad(y, mcs.weight, g)
    raw = mcs.weight.detach().clone().requires_grad_()
    want_y = F.conv2d(x, reference.constrain_mcs_weight(raw, mcs.eps), padding=2, groups=6)
    want, = torch.autograd.grad(want_y, raw, g)
    assert rel_err(y, want_y) < 1e-12 and rel_err(got, want) < 1e-12
