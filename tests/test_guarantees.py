"""Guarantees that must survive a rewrite of the internals: load_adapter refuses a base changed in one entry, seed=
gives every layer its own reproducible draws, and a compact save keeps the factors of a trained Nyström adapter.
Only the public API is used, except in the two small helpers at the top (easy to adapt to new internals)."""

import copy

import pytest
import torch
from torch import nn

import nlora

# init="nystrom" keeps the base weight and warns that it moves the outputs: expected here
pytestmark = pytest.mark.filterwarnings("ignore:init 'nystrom' keeps the base weights:UserWarning")


def adapter(model, name):
    """The ``default`` adapter module of layer ``name`` (its lora_A/lora_B and Nyström index sets rows/cols)."""
    return model.get_submodule(name).adapters["default"]


def sampled_positions(shape):
    """The (row, column) entries of an (out, in) weight that the base check compares (nlora.layer.weight_sample)."""
    from nlora.layer import sample_positions
    out_features, in_features = shape
    positions = sample_positions(out_features * in_features, torch.device("cpu")).tolist()
    return sorted({divmod(p, in_features) for p in positions})


def mlp():
    """Layer "0" has an (8, 6) weight; "2" and "4" have the same (8, 8) shape."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))


def train(model, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randn(16, 8)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


# (inject kwargs, message of the refusal): two regular adapters (base sample check), one compact IntTune adapter
KINDS = {"lora": (dict(init="lora"), "base weight differs"),
         "slora": (dict(init="slora"), "base weight differs"),
         "inttune": (dict(init="nystrom", train="middle", index="random", seed=0), "differ")}


@pytest.fixture(params=list(KINDS), scope="module")
def saved(request, tmp_path_factory):
    """(kind, base model, path of the adapter trained on it and saved compact on layer "0")."""
    kwargs, _ = KINDS[request.param]
    base = mlp()
    model = nlora.inject(copy.deepcopy(base), ["0"], rank=2, **kwargs)
    train(model)
    path = nlora.save_adapter(model, tmp_path_factory.mktemp(request.param) / "ad")
    return request.param, base, path


def refused(kind, base, path, i, j):
    """Whether load_adapter refuses ``base`` with entry (i, j) of layer "0" changed (with the expected message)."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        model[0].weight[i, j] += 1e-3
    try:
        nlora.load_adapter(model, path)
    except ValueError as err:
        assert KINDS[kind][1] in str(err)
        return True
    return False


def test_unchanged_base_loads(saved):  # the control: the base it was saved on is accepted
    nlora.load_adapter(copy.deepcopy(saved[1]), saved[2])


def test_change_at_a_checked_entry_is_refused(saved):
    """Regular adapters: every sampled position; IntTune: every entry of the Nyström rows I and columns J."""
    kind, base, path = saved
    if kind == "inttune":
        model = nlora.load_adapter(copy.deepcopy(base), path)
        rows, cols = adapter(model, "0").rows.tolist(), adapter(model, "0").cols.tolist()
        checked = sorted({(i, j) for i in range(8) for j in range(6) if i in rows or j in cols})
    else:
        checked = sampled_positions((8, 6))
    unrefused = [(i, j) for i, j in checked if not refused(kind, base, path, i, j)]
    assert not unrefused, f"{kind}: a base changed at {unrefused} was accepted"


@pytest.mark.xfail(strict=True, reason="gap: only a sample of the weight is checked (16 positions of a regular "
                                       "adapter's base, the Nyström rows/columns of a compact one), so a change "
                                       "elsewhere in the base loads silently")
def test_change_at_any_entry_is_refused(saved):
    kind, base, path = saved
    unrefused = [(i, j) for i in range(8) for j in range(6) if not refused(kind, base, path, i, j)]
    assert not unrefused, f"{kind}: a base changed at {unrefused} was accepted"


@pytest.mark.parametrize("init, options", [("lora", {}), ("nystrom", {"index": "random"})])
def test_seed_gives_each_layer_its_own_reproducible_draws(init, options):
    def draws(seed, global_seed):
        torch.manual_seed(global_seed)  # the draws must come from seed=, not from the global RNG
        model = nlora.inject(mlp(), ["2", "4"], rank=3, init=init, seed=seed, **options)
        return [torch.cat([adapter(model, n).lora_A.detach().flatten()] +
                          ([adapter(model, n).rows, adapter(model, n).cols] if init == "nystrom" else []))
                for n in ("2", "4")]

    first = draws(0, global_seed=1)
    assert not torch.equal(first[0], first[1]), "two same-shaped layers got the same draws"
    again = draws(0, global_seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "the same seed gave other draws"
    other = draws(1, global_seed=1)
    assert not any(torch.equal(a, b) for a, b in zip(first, other)), "another seed gave the same draws"
    if init == "nystrom":  # the index sets themselves differ between the two layers
        model = nlora.inject(mlp(), ["2", "4"], rank=3, init=init, seed=0, **options)
        sets = [(adapter(model, n).rows.tolist(), adapter(model, n).cols.tolist()) for n in ("2", "4")]
        assert sets[0] != sets[1]


@pytest.mark.parametrize("how", ["sgd", "B only"])
def test_compact_save_keeps_trained_nystrom_factors(tmp_path, how):
    base = mlp()
    model = nlora.inject(copy.deepcopy(base), ["0", "2"], rank=2, init="nystrom", train="all")
    if how == "sgd":
        train(model)
    else:
        with torch.no_grad():
            for n in ("0", "2"):
                adapter(model, n).lora_B.mul_(1.5).add_(0.01)
    nlora.save_adapter(model, tmp_path / "ad")  # compact by default
    loaded = nlora.load_adapter(copy.deepcopy(base), tmp_path / "ad")
    for n in ("0", "2"):
        for key in ("lora_A", "lora_B"):
            assert torch.equal(getattr(adapter(loaded, n), key), getattr(adapter(model, n), key)), (n, key)
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
