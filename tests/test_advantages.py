"""group_advantages on every backend against the float64 reference, and the reference against the original."""

import original_thinkless
import pytest
import torch
from conftest import TRITON_ON_CPU, backend_params
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkless.kernels import group_advantages, reference


def _rewards_and_ids(group_sizes, gen, *, thinkless_rewards=False):
    """Shuffled samples whose group ids are arbitrary (negative, large, sparse) integers."""
    ids = torch.cat([torch.full((n,), g * 7919 - 10**6, dtype=torch.int64) for g, n in enumerate(group_sizes)])
    if thinkless_rewards:  # the reward table: correct short 1.0, correct think 0.5, wrong -1.0
        table = torch.tensor([1.0, 0.5, -1.0])
        rewards = table[torch.randint(0, 3, (len(ids),), generator=gen)]
    else:
        rewards = torch.randn(len(ids), generator=gen) * 3 + 1
    perm = torch.randperm(len(ids), generator=gen)
    return rewards[perm], ids[perm]


GROUPINGS = {
    "ones": [1, 1, 1],
    "pairs": [2, 2, 2, 2, 2],
    "eights": [8] * 6,
    "mixed": [1, 2, 8, 3, 1, 8, 5],
    "one_big": [300],  # more than one kernel block
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("grouping", GROUPINGS.keys())
@pytest.mark.parametrize("normalize_std", [False, True])
@pytest.mark.parametrize("thinkless_rewards", [False, True])
def test_matches_reference(device, backend, grouping, normalize_std, thinkless_rewards):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    rewards, ids = _rewards_and_ids(GROUPINGS[grouping], gen, thinkless_rewards=thinkless_rewards)
    truth = reference.group_advantages(rewards.double(), ids, normalize_std=normalize_std, eps=1e-6)
    out = group_advantages(rewards.to(device), ids.to(device), normalize_std=normalize_std, backend=backend)
    assert out.dtype == torch.float32 and out.shape == rewards.shape and out.device.type == device.type
    torch.testing.assert_close(out.cpu().double(), truth.double(), rtol=1e-5, atol=1e-5)


def _layout(name: str, gen: torch.Generator) -> torch.Tensor:
    """Group ids of 40 groups of 1 to 9 samples in the layouts the kernels treat apart: runs in order (the
    trainer's), dense ids shuffled (a counting sort), sparse ids shuffled (a comparison sort)."""
    sizes = torch.randint(1, 10, (40,), generator=gen)
    dense = torch.repeat_interleave(torch.arange(40), sizes)
    ids = {
        "runs": dense * 3 + 5,
        "dense_shuffled": dense[torch.randperm(len(dense), generator=gen)],
        "dense_negative_shuffled": (dense - 20)[torch.randperm(len(dense), generator=gen)],
        "sparse_extremes_shuffled": torch.where(dense % 2 == 0, -(2**62) + dense, 2**62 - dense),
    }[name]
    return ids[torch.randperm(len(ids), generator=gen)] if name == "sparse_extremes_shuffled" else ids


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layout", ["runs", "dense_shuffled", "dense_negative_shuffled", "sparse_extremes_shuffled"])
def test_id_layouts(device, backend, layout):
    gen = torch.Generator().manual_seed(11)
    ids = _layout(layout, gen)
    rewards = torch.randn(len(ids), generator=gen)
    for normalize_std in (False, True):
        truth = reference.group_advantages(rewards.double(), ids, normalize_std=normalize_std)
        out = group_advantages(rewards.to(device), ids.to(device), normalize_std=normalize_std, backend=backend)
        torch.testing.assert_close(out.cpu().double(), truth.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_eps_and_dtypes(device, backend):
    gen = torch.Generator().manual_seed(3)
    rewards, ids = _rewards_and_ids([4, 4, 2], gen)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        r = rewards.to(dtype)
        truth = reference.group_advantages(r.double(), ids, normalize_std=True, eps=0.5)
        out = group_advantages(r.to(device), ids.to(device), normalize_std=True, eps=0.5, backend=backend)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.cpu().double(), truth.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_zero_variance_and_empty(device, backend):
    rewards = torch.tensor([0.5, 0.5, 0.5, -1.0, -1.0, 1.0], device=device)
    ids = torch.tensor([4, 4, 4, 9, 9, 2], device=device)
    for normalize_std in (False, True):
        out = group_advantages(rewards, ids, normalize_std=normalize_std, backend=backend)
        assert torch.equal(out.cpu(), torch.zeros(6))  # all-equal groups and the group of one give exactly 0
    empty = group_advantages(torch.empty(0, device=device), torch.empty(0, dtype=torch.long, device=device))
    assert empty.shape == (0,)


@pytest.mark.parametrize("normalize_std", [False, True])
def test_reference_matches_original_code(normalize_std):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    rewards, ids = _rewards_and_ids(GROUPINGS["mixed"], gen)
    rewards = rewards.double()
    expected = original_thinkless.group_advantages(rewards.tolist(), ids.tolist(), normalize_std, 1e-6)
    out = reference.group_advantages(rewards, ids, normalize_std=normalize_std, eps=1e-6)
    torch.testing.assert_close(out.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    seed=st.integers(0, 2**31 - 1),
    backend=st.sampled_from(["torch", "triton"] if TRITON_ON_CPU else ["torch"]),
)
def test_properties(sizes, seed, backend):
    """Advantages sum to zero within every group, and do not depend on sample order or on id values."""
    gen = torch.Generator().manual_seed(seed)
    rewards, ids = _rewards_and_ids(sizes, gen)
    out = group_advantages(rewards, ids, backend=backend).double()
    group_sums = torch.zeros(ids.max() - ids.min() + 1, dtype=torch.float64).index_add_(0, ids - ids.min(), out)
    assert group_sums.abs().max() < 1e-4
    perm = torch.randperm(len(ids), generator=gen)
    relabeled = ids * 3 + 17
    shuffled = group_advantages(rewards[perm], relabeled[perm], backend=backend).double()
    torch.testing.assert_close(shuffled, out[perm], rtol=1e-5, atol=1e-6)  # only the summation order differs


@pytest.mark.parametrize("backend", backend_params())
def test_lists_and_numpy_are_accepted(backend):
    import numpy as np

    expected = group_advantages(torch.tensor([1.0, -1.0, 0.5, 0.5]), torch.tensor([3, 3, 8, 8]), backend=backend)
    from_lists = group_advantages([1.0, -1.0, 0.5, 0.5], [3, 3, 8, 8], backend=backend)
    from_numpy = group_advantages(np.array([1.0, -1.0, 0.5, 0.5]), np.array([3, 3, 8, 8]), backend=backend)
    torch.testing.assert_close(from_lists, expected)
    torch.testing.assert_close(from_numpy, expected)


@pytest.mark.parametrize("backend", backend_params())
def test_float64_rewards_keep_their_digits(device, backend):
    """Rewards that differ only past float32 precision still give exact advantages (the output is float32)."""
    rewards = torch.tensor([1e8, 1e8 + 1, 1e8 + 2, 5.0], dtype=torch.float64, device=device)
    ids = torch.tensor([0, 0, 0, 1], device=device)
    out = group_advantages(rewards, ids, backend=backend)
    assert torch.equal(out.cpu(), torch.tensor([-1.0, 0.0, 1.0, 0.0]))
    out = group_advantages(rewards, ids, normalize_std=True, backend=backend)
    torch.testing.assert_close(out.cpu(), torch.tensor([-1.0, 0.0, 1.0, 0.0]), rtol=1e-5, atol=1e-5)
