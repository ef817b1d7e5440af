"""The reference against SPEC.md itself, not against the fast model: a forward pass written
from SPEC sections 2-3 that reads the published keys by name, and SPEC's own numbers (depths,
channel splits, the MCSConv initialisation and constraint). A mistake the reference and the
fast model shared (a BatchNorm normalising the other branch, swapped output rows, a wrong
depth), with interop swapped to match, passed every parity test: these tests catch it."""
import pytest
import torch
import torch.nn.functional as F

from sficonv_ext import reference
from sficonv_ext.reference import layers

from conftest import randomise_batchnorms

# SPEC section 3.
SPEC_DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _bn(sd, name, x, train, eps=1e-5):
    if train:
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = sd[name + ".running_mean"], sd[name + ".running_var"]
    y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)
    return y * sd[name + ".weight"][None, :, None, None] + sd[name + ".bias"][None, :, None, None]


def _conv(sd, name, x, padding):
    return F.conv2d(x, sd[name + ".weight"], padding=padding)


def _pool(x, stride):  # SPEC 2: stride 2 is a 2x2 average pool of the inputs first
    return F.avg_pool2d(x, 2, 2) if stride == 2 else x


def _sficonv_b(sd, name, xs, xf, k, stride, relu, train):
    """SFIConvBR (relu) / SFIConvB: Y_s = s2s(X_s) + f2s(X_f), Y_f = s2f(X_s) + f2f(X_f),
    then bn_s / bn_f per branch."""
    xs, xf = _pool(xs, stride), _pool(xf, stride)
    c = name + ".conv"
    ys = _conv(sd, c + ".s2s", xs, k // 2) + _conv(sd, c + ".f2s", xf, k // 2)
    yf = _conv(sd, c + ".s2f", xs, k // 2) + _conv(sd, c + ".f2f", xf, k // 2)
    ys, yf = _bn(sd, name + ".bn_s", ys, train), _bn(sd, name + ".bn_f", yf, train)
    return (F.relu(ys), F.relu(yf)) if relu else (ys, yf)


def _last_b(sd, name, xs, xf, stride, train):
    """LastSFIConvB: one tensor s2s(X_s) + f2f(X_f), one bn_s."""
    xs, xf = _pool(xs, stride), _pool(xf, stride)
    y = _conv(sd, name + ".conv.s2s", xs, 0) + _conv(sd, name + ".conv.f2f", xf, 0)
    return _bn(sd, name + ".bn_s", y, train)


def _first_br(sd, name, x, train):
    """FirstSFIConvBR: X_s = s2s(x), X_f = f2f(MCSConv(x)), 5x5 depthwise, padding 2."""
    w = sd[name + ".conv.MCSConv.weight"]
    m = F.conv2d(x, w, padding=2, groups=w.shape[0])
    xs = _bn(sd, name + ".bn_s", _conv(sd, name + ".conv.s2s", x, 0), train)
    xf = _bn(sd, name + ".bn_f", _conv(sd, name + ".conv.f2f", m, 0), train)
    return F.relu(xs), F.relu(xf)


def spec_forward(sd, x, depths, train):
    """SFIConv-ResNet from SPEC section 3, weights read from a bare-layout state_dict."""
    x = F.relu(_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), train))
    x = F.max_pool2d(x, 3, 2, 1)
    # layer1's first block: SFIC1's output, not the block's input, is the residual.
    rs, rf = _first_br(sd, "layer1.0.SFIC1", x, train)
    a = _sficonv_b(sd, "layer1.0.SFIC2", rs, rf, 3, 1, True, train)
    a = _sficonv_b(sd, "layer1.0.SFIC3", *a, 1, 1, False, train)
    r = _sficonv_b(sd, "layer1.0.downsample.0", rs, rf, 1, 1, False, train)
    xs, xf = F.relu(a[0] + r[0]), F.relu(a[1] + r[1])
    for stage, (blocks, stride) in enumerate(zip(depths[:3], (1, 2, 2)), start=1):
        for b in range(1 if stage == 1 else 0, blocks):
            name, s = f"layer{stage}.{b}", stride if b == 0 else 1
            a = _sficonv_b(sd, name + ".SFIC1", xs, xf, 1, 1, True, train)
            a = _sficonv_b(sd, name + ".SFIC2", *a, 3, s, True, train)  # SFIC2 carries it
            a = _sficonv_b(sd, name + ".SFIC3", *a, 1, 1, False, train)
            r = (_sficonv_b(sd, name + ".downsample.0", xs, xf, 1, s, False, train) if b == 0
                 else (xs, xf))
            xs, xf = F.relu(a[0] + r[0]), F.relu(a[1] + r[1])
    a = _sficonv_b(sd, "layer4.0.SFIC1", xs, xf, 1, 1, True, train)
    a = _sficonv_b(sd, "layer4.0.SFIC2", *a, 3, 2, True, train)
    x = F.relu(_last_b(sd, "layer4.0.SFIC3", *a, 1, train)
               + _last_b(sd, "layer4.0.downsample.0", xs, xf, 2, train))
    for b in range(1, depths[3]):
        name = f"layer4.{b}"
        out = F.relu(_bn(sd, name + ".bn1", _conv(sd, name + ".conv1", x, 0), train))
        out = F.relu(_bn(sd, name + ".bn2", _conv(sd, name + ".conv2", out, 1), train))
        x = F.relu(_bn(sd, name + ".bn3", _conv(sd, name + ".conv3", out, 0), train) + x)
    return x.mean(dim=(2, 3)) @ sd["fc.weight"].T + sd["fc.bias"]


@pytest.mark.parametrize("depth,size", [(26, (64, 64)), (26, (65, 97)), (50, (67, 61))])
@pytest.mark.parametrize("train", [False, True])
def test_reference_computes_what_spec_states(depth, size, train):
    net = reference.SFIConvResNet(SPEC_DEPTHS[depth]).double()
    randomise_batchnorms(net)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    net.train(train)
    with torch.no_grad():
        got, want = net(x), spec_forward(sd, x, SPEC_DEPTHS[depth], train)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-10


def test_depths_are_specs():
    assert dict(reference.DEPTHS) == SPEC_DEPTHS
    for depth, blocks in SPEC_DEPTHS.items():
        net = reference.SFIConvResNet(reference.DEPTHS[depth])
        assert tuple(len(getattr(net, f"layer{i}")) for i in range(1, 5)) == blocks


def test_channel_split_of_odd_counts_is_specs():
    # SPEC 2: frequency int(alpha * C), spatial C - int(alpha * C).
    conv = layers.SFIConv(7, 10, 1, padding=0)
    assert (conv.s2s.in_channels, conv.f2f.in_channels) == (4, 3)
    assert (conv.s2s.out_channels, conv.f2f.out_channels) == (5, 5)
    assert (conv.f2s.in_channels, conv.f2s.out_channels) == (3, 5)
    first = layers.FirstSFIConv(3, 9, 1, padding=0)
    assert (first.s2s.out_channels, first.f2f.out_channels) == (5, 4)
    last = layers.LastSFIConv(9, 6, 1, padding=0)
    assert (last.s2s.in_channels, last.f2f.in_channels) == (5, 4)
    assert last.s2s.out_channels == last.f2f.out_channels == 6


def test_mcs_initialisation_is_specs_formula_exactly():
    # SPEC 1: w ~ N(0, 1); per channel divide all 25 taps by the 24 off-centre taps' sum; then
    # the centre is -1. The published filter is frozen, so this IS the filter.
    torch.manual_seed(3)
    expected = torch.randn(64, 1, 5, 5)
    for c in range(64):
        expected[c] /= expected[c].sum() - expected[c, 0, 2, 2]
        expected[c, 0, 2, 2] = -1.0
    torch.manual_seed(3)
    mcs = layers.MCSConv(64)
    assert torch.equal(mcs.weight, expected)
    assert not mcs.weight.requires_grad and mcs.const_weight.data_ptr() == mcs.weight.data_ptr()


def test_mcs_is_a_5x5_depthwise_correlation_with_padding_2():
    mcs = layers.MCSConv(4).double()
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64)
    y = mcs(x)
    assert y.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    by_hand = (padded[0, 1, 3:8, 4:9] * mcs.weight[1, 0]).sum()  # output pixel (3, 4)
    assert abs((y[0, 1, 3, 4] - by_hand).item()) < 1e-12


def test_learnable_constraint_sign_rule():
    # SPEC 1: |S_c| clamped to at least eps keeping its sign, 0 counting as positive.
    eps = 1e-3
    w = torch.zeros(3, 1, 3, 3, dtype=torch.float64)
    w[0, 0, 0, 0] = -eps / 10  # S = -eps/10: divided by -eps
    w[1, 0, 0, 0], w[1, 0, 0, 1] = 1.0, -1.0  # S = 0 exactly: divided by +eps
    w[2, 0, 0, 0] = 2.0  # S = 2: no clamp
    out = reference.constrain_mcs_weight(w, eps)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.1)
    assert out[1, 0, 0, 0].item() == pytest.approx(1 / eps)
    assert out[1, 0, 0, 1].item() == pytest.approx(-1 / eps)
    assert out[2, 0, 0, 0].item() == pytest.approx(1.0)
    assert (out[:, 0, 1, 1] == -1).all()
