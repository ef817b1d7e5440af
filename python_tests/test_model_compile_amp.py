"""The fast model under torch.compile (no graph break) and autocast."""
import pytest
import torch

from sficonv_ext import models

from conftest import rel_err


@pytest.mark.parametrize("learnable", [False, True])
def test_compile_fullgraph_matches_eager(learnable):
    model = models.sfi_resnet26(mcs_learnable=learnable)
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert rel_err(grads[name], p.grad) < 1e-4, name
    model.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


def test_autocast_bfloat16_forward_and_backward():
    model = models.sfi_resnet26().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expect = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), expect) < 0.1
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().sum()
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
