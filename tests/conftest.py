import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci": the same 25 examples per test on every run (derandomized, no example database), so CI is reproducible and a
# numerically unlucky draw cannot turn it red at random; "long" explores at random (HYPOTHESIS_PROFILE=long).
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def state_hash(model: torch.nn.Module) -> dict:
    """A bit-exact snapshot of every tensor in the model's state_dict (names, dtypes, values)."""
    plain = {k: v.get_original_weight() if type(v).__name__ == "NF4Tensor" else v  # torchao 4-bit: its values
             for k, v in model.state_dict(keep_vars=False).items()}
    return {k: (v.dtype, v.shape, v.detach().clone()) for k, v in plain.items()}


def assert_same_state(before: dict, model: torch.nn.Module) -> None:
    after = state_hash(model)
    assert before.keys() == after.keys()
    for k in before:
        assert before[k][0] == after[k][0] and before[k][1] == after[k][1], k
        assert torch.equal(_bits(before[k][2]), _bits(after[k][2])), k  # bitwise: NaN == NaN here


def _bits(t: torch.Tensor) -> torch.Tensor:
    # a copy in a fresh contiguous layout: .contiguous() keeps a 1-element tensor's stride, which .view rejects
    return t.detach().reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 16), torch.nn.GELU(),
                               torch.nn.Linear(16, 5))
