import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsparse import nm

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 2)]


@st.composite
def weights(draw):
    n, m = draw(st.sampled_from(PATTERNS))
    out = m * draw(st.integers(1, 6))
    inp = m * draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g).to(dtype)
    if draw(st.booleans()):  # many exact ties
        w = torch.round(w * 2) / 2
    return w, n, m


@settings(max_examples=60, deadline=None)
@given(weights())
def test_mask_keeps_n_largest_per_group(case):
    w, n, m = case
    mask = nm.nm_mask(w.abs().float(), n, m)
    groups = mask.reshape(w.shape[0], -1, m)
    assert (groups.sum(-1) == n).all()
    a = w.abs().float().reshape(w.shape[0], -1, m)
    kept_min = torch.where(groups, a, torch.full_like(a, float("inf"))).amin(-1)
    dropped_max = torch.where(groups, torch.full_like(a, -1.0), a).amax(-1)
    assert (kept_min >= dropped_max).all()


@settings(max_examples=60, deadline=None)
@given(weights())
def test_gather_scatter_roundtrip_and_positions(case):
    w, n, m = case
    mask = nm.nm_mask(w.abs().float(), n, m)
    idx = nm.kept_positions(mask, n, m)
    assert idx.dtype == torch.uint8 and idx.shape == (w.shape[0], w.shape[1] * n // m)
    pos = idx.reshape(w.shape[0], -1, n).long()
    assert (pos[..., 1:] > pos[..., :-1]).all()  # ascending within a group
    values = nm.gather_kept(w, idx, m)
    dense = nm.scatter_kept(values, idx, n, m)
    assert torch.equal(dense, torch.where(mask, w, torch.zeros_like(w)))


@settings(max_examples=60, deadline=None)
@given(weights())
def test_double_pruned_transpose_support_inside_and_nm_along_out(case):
    w, n, m = case
    idx = nm.kept_positions(nm.nm_mask(w.abs().float(), n, m), n, m)
    values = nm.gather_kept(w, idx, m)
    keep_t = nm.transpose_keep(values, idx, n, m)
    wt = nm.dense_transpose_from_kept(values, idx, keep_t, n, m)  # (in, out)
    effective = nm.dense_from_kept(values, idx, n, m)
    support_t = nm.scatter_kept(keep_t.float(), idx, n, m).t() > 0
    assert not (support_t & ~(nm.scatter_kept(torch.ones_like(values), idx, n, m).t() > 0)).any()
    assert (support_t.reshape(w.shape[1], -1, m).sum(-1) <= n).all()
    assert torch.equal(wt, torch.where(support_t, effective.t(), torch.zeros_like(wt)))
    # the second pruning keeps the largest kept magnitudes of each group along out
    scores = torch.where(nm.scatter_kept(torch.ones_like(values), idx, n, m) > 0, effective.abs().float(),
                         torch.full_like(effective, -1.0, dtype=torch.float32)).t()
    assert torch.equal(support_t, nm.nm_mask(scores, n, m) & (scores >= 0))


def test_ties_break_towards_lower_position_on_every_device():
    w = torch.ones(4, 8)
    mask = nm.nm_mask(w, 2, 4)
    assert mask[0].tolist() == [True, True, False, False] * 2
    if torch.cuda.is_available():
        assert torch.equal(nm.nm_mask(w.cuda(), 2, 4).cpu(), mask)


def test_transpose_keep_is_deterministic():
    g = torch.Generator().manual_seed(0)
    w = torch.round(torch.randn(64, 64, generator=g) * 2) / 2
    idx = nm.kept_positions(nm.nm_mask(w.abs(), 2, 4), 2, 4)
    v = nm.gather_kept(w, idx, 4)
    first = nm.transpose_keep(v, idx, 2, 4)
    for _ in range(3):
        assert torch.equal(nm.transpose_keep(v.clone(), idx.clone(), 2, 4), first)


@pytest.mark.parametrize("bad", ["5:4", "0:4", "4:4", "2-4", "a:b", (3, 2)])
def test_parse_pattern_rejects_invalid(bad):
    with pytest.raises(ValueError, match="N:M|0 < N < M"):
        nm.parse_pattern(bad)


def test_indivisible_dimension_names_fix():
    with pytest.raises(ValueError, match="not divisible by the N:M group size M = 4"):
        nm.nm_mask(torch.randn(3, 10), 2, 4)
