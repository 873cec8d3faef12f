import torch

import nlora


def test_inject_train_merge_roundtrip(mlp):
    x = torch.randn(7, 24)
    nlora.inject(mlp, ["0", "2"], rank=4, init="slora")
    y_init = mlp(x)
    opt = torch.optim.AdamW([p for p in mlp.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        mlp(x).square().mean().backward()
        opt.step()
    y = mlp(x)
    assert not torch.allclose(y, y_init)
    nlora.merge(mlp)
    torch.testing.assert_close(mlp(x), y, rtol=1e-5, atol=1e-5)
