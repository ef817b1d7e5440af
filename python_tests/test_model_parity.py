"""Fast model vs reference in float64: outputs, running statistics, gradients, Adam steps."""
import pytest
import torch

from sficonv_ext import models, ops
from sficonv_ext.models.interop import official_rules
from sficonv_ext.reference import constrain_mcs_weight

from conftest import make_pair, rel_err

TOL = 1e-10


def _ref_named(ref, layout="wrapper"):
    # Parameters of the reference under the published keys of the given layout.
    return dict(ref.named_parameters(remove_duplicate=False))


def _compare_grads(ref, fast):
    ref_params = _ref_named(ref)
    own_params = dict(fast.named_parameters())
    checked = 0
    for rule in official_rules(fast):
        p = own_params.get(rule.own_key)
        if p is None or p.grad is None:
            continue
        for part in rule.parts:
            if not part.source:
                continue
            key = models.interop._to_layout(part.key, "wrapper")
            ref_grad = ref_params[key].grad
            assert ref_grad is not None, key
            assert rel_err(part.take(p.grad), ref_grad) < TOL, key
            checked += 1
    # Every reference parameter that got a gradient was checked.
    assert checked == sum(1 for p in ref_params.values() if p.grad is not None)


def _compare_state(ref, fast, tol=TOL):
    exported = models.to_official_state_dict(fast, "wrapper")
    for key, value in ref.state_dict().items():
        if value.is_floating_point():
            assert rel_err(exported[key], value) < tol, key
        else:
            assert torch.equal(exported[key], value), key


@pytest.mark.parametrize("depth,conv_backend", [(26, "auto"), (50, "auto"), (26, "winograd")])
def test_eval_forward_parity(depth, conv_backend):
    if conv_backend == "winograd" and not ops.backends()["cpp"]:
        pytest.skip("C++ extension not built")
    ref, fast = make_pair(depth)
    models.set_conv_backend(fast, conv_backend)
    ref.eval(), fast.eval()
    x = torch.randn(2, 3, 65, 97, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(fast(x), ref(x)) < TOL


# conv_backend "winograd": every 3x3 convolution on the Winograd kernels; pointwise "gemm":
# every 1x1 convolution after the first layer as one matrix product ("auto" keeps float64 on
# PyTorch's convolutions for both).
@pytest.mark.parametrize("depth,mcs_backend,conv_backend,pointwise_backend", [
    (26, "auto", "auto", "auto"), (50, "auto", "auto", "auto"), (26, "cpp", "auto", "auto"),
    (26, "torch", "auto", "auto"), (26, "auto", "winograd", "auto"),
    (50, "auto", "winograd", "auto"), (26, "auto", "auto", "gemm"),
    (50, "auto", "winograd", "gemm")])
def test_train_step_parity(depth, mcs_backend, conv_backend, pointwise_backend):
    if (mcs_backend == "cpp" or conv_backend == "winograd") and not ops.backends()["cpp"]:
        pytest.skip("C++ extension not built")
    ref, fast = make_pair(depth)
    fast.layer1[0].SFIC1.conv.mcs.backend = mcs_backend
    models.set_conv_backend(fast, conv_backend)
    models.set_pointwise_backend(fast, pointwise_backend)
    ref.train(), fast.train()
    x = torch.randn(3, 3, 67, 61, dtype=torch.float64)
    target = torch.tensor([0, 1, 1])
    out_ref, out_fast = ref(x), fast(x)
    assert rel_err(out_fast, out_ref) < TOL
    _compare_state(ref, fast)  # running statistics after one training forward
    loss_ref = torch.nn.functional.cross_entropy(out_ref, target)
    loss_fast = torch.nn.functional.cross_entropy(out_fast, target)
    loss_ref.backward(), loss_fast.backward()
    _compare_grads(ref, fast)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-3)
    opt_fast = torch.optim.Adam(fast.parameters(), lr=1e-3)
    opt_ref.step(), opt_fast.step()
    # Adam divides each gradient element by its own magnitude, which turns a 1e-16 rounding
    # difference in a near-zero gradient into a 1e-12 weight difference: compare weights to
    # 1e-8, and the outputs of the updated models (what matters) to TOL below.
    _compare_state(ref, fast, tol=1e-8)
    x2 = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    assert rel_err(fast(x2), ref(x2)) < TOL
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert rel_err(fast(x2), ref(x2)) < TOL


def test_bare_layout_parity():
    ref, fast = make_pair(26, layout="bare")
    ref.eval(), fast.eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(fast(x), ref(x)) < TOL


@pytest.mark.parametrize("depth", [101, 152])
def test_deep_models_build_and_shape(depth):
    model = getattr(models, f"sfi_resnet{depth}")(num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, models.MIN_INPUT_SIZE, 40))
    assert out.shape == (1, 5)
    assert torch.isfinite(out).all()


def test_fast_model_matches_published_parameter_count():
    fast = models.sfi_resnet26()
    exported = models.to_official_state_dict(fast, "wrapper")
    # Exported state carries the published duplicates (const_weight) and its 363 entries.
    assert len(exported) == 363
    from sficonv_ext import reference
    ref = reference.PublishedTrainingWrapper(26)
    n_params = sum(v.numel() for k, v in exported.items()
                   if k in dict(ref.named_parameters(remove_duplicate=False)))
    assert n_params == 13_953_538


def test_learnable_mcs_trains_and_matches_constraint():
    fast = models.sfi_resnet26(mcs_learnable=True, mcs_init="stable").double()
    mcs = fast.layer1[0].SFIC1.conv.mcs
    assert mcs.weight.requires_grad
    with torch.no_grad():  # a raw weight off the constraint, as training leaves it
        mcs.weight.add_(torch.rand_like(mcs.weight) * 0.1).mul_(3.0)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    fast(x).sum().backward()
    eff = mcs.effective_weight()
    assert torch.all(eff[:, 0, 2, 2] == -1)
    torch.testing.assert_close(eff.sum(dim=(1, 2, 3)), torch.zeros(64, dtype=torch.float64))
    # The same network with the constrained filter frozen in: equal outputs, and the raw
    # weight's gradient is the frozen filter's gradient taken back through the constraint.
    frozen = models.sfi_resnet26().double()
    state = fast.state_dict()
    state["layer1.0.SFIC1.conv.mcs.weight"] = eff.detach()
    frozen.load_state_dict(state)
    fixed = frozen.layer1[0].SFIC1.conv.mcs.weight.requires_grad_()
    out = frozen(x)
    out.sum().backward()
    with torch.no_grad():
        assert rel_err(fast(x), out) < 1e-10
    raw = mcs.weight.detach().clone().requires_grad_()
    want, = torch.autograd.grad(constrain_mcs_weight(raw, mcs.eps), raw, fixed.grad)
    assert rel_err(mcs.weight.grad, want) < 1e-10
