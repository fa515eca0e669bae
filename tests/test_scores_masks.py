import math

import pytest
import torch

from optimum_gblm import GBLMConfig
from optimum_gblm.masks import check_nm, layer_mask, nm_mask, row_masks, select_mask, wanda_variant_mask
from optimum_gblm.scores import SCORES

W = torch.tensor([[1.0, -2.0, 3.0, -4.0], [-0.5, 0.25, 2.0, -1.0]])
A = torch.tensor([4.0, 1.0, 0.25, 9.0])  # a_j; sqrt(a) = [2, 1, 0.5, 3]
G = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 2.0, 0.5]])


def test_scores_match_a_hand_computation():
    # magnitude: |W|
    assert torch.equal(SCORES["magnitude"].fn(W, None, None), W.abs())
    # wanda: |W| * sqrt(a): row 0 -> [1*2, 2*1, 3*0.5, 4*3]
    expected_wanda = torch.tensor([[2.0, 2.0, 1.5, 12.0], [1.0, 0.25, 1.0, 3.0]])
    assert torch.allclose(SCORES["wanda"].fn(W, A, None), expected_wanda)
    # gblm: |W| * (sqrt(a) + G): row 1 -> [0.5*(2+1), 0.25*(1+0), 2*(0.5+2), 1*(3+0.5)]
    expected_gblm = torch.tensor([[2.1, 2.4, 2.4, 13.6], [1.5, 0.25, 5.0, 3.5]])
    assert torch.allclose(SCORES["gblm"].fn(W, A, G), expected_gblm)
    # gradient only: |W| * G
    assert torch.allclose(SCORES["gradient"].fn(W, A, G), torch.tensor([[0.1, 0.4, 0.9, 1.6], [0.5, 0.0, 4.0, 0.5]]))
    # inverse: |W| sqrt(a) / (G + 1e-8)
    assert math.isclose(SCORES["gblm_inverse"].fn(W, A, G)[0, 3].item(), 12.0 / 0.4, rel_tol=1e-6)


def test_row_masks_remove_the_lowest_per_row_with_stable_ties():
    scores = torch.tensor([[2.0, 2.0, 1.5, 12.0], [1.0, 0.25, 1.0, 3.0]])
    mask = row_masks(scores, 0.5)
    # row 0: 1.5 and the first of the tied 2.0s go; row 1: 0.25 and the first 1.0 go
    assert mask.tolist() == [[False, True, False, True], [False, False, True, True]]


def test_layer_mask_uses_one_threshold():
    scores = torch.tensor([[5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0]])
    assert layer_mask(scores, 0.5).tolist() == [[True] * 4, [False] * 4]
    assert row_masks(scores, 0.5).tolist() == [[False, False, True, True]] * 2


def test_nm_mask_prunes_n_in_every_group_of_m():
    scores = torch.arange(16.0).flip(0).reshape(2, 8)
    mask = nm_mask(scores, 2, 4)
    assert check_nm(mask, 2, 4)
    assert mask[0].tolist() == [True, True, False, False, True, True, False, False]
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_check_nm_detects_violations():
    mask = torch.ones(1, 4, dtype=torch.bool)
    mask[0, 0] = False
    assert not check_nm(mask, 2, 4)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_wanda_variant_reaches_target_within_tolerance(sparsity):
    torch.manual_seed(0)
    scores = torch.rand(64, 128)
    mask = wanda_variant_mask(scores, sparsity)
    assert abs((1 - mask.float().mean().item()) - sparsity) <= 0.001
    # it is not per-row exact: rows differ in how many they keep
    assert (~mask).sum(1).unique().numel() > 1


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("unstructured", 0.25), ("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.25)])
def test_select_mask_exact_sparsity(pattern, sparsity):
    torch.manual_seed(0)
    scores = torch.rand(16, 32)
    mask = select_mask(scores, sparsity, GBLMConfig(pattern=pattern, sparsity=sparsity).sparsity_pattern)
    assert (~mask).sum().item() == int(16 * 32 * sparsity)
    assert ((~mask).sum(1) == int(32 * sparsity)).all()


def test_auto_alpha_matches_a_hand_computation():
    from optimum_gblm.scores import auto_alpha

    # sqrt(a) = [2, 1, 0.5, 3]: lower median 1.0; G sorted [0, .1, .2, .3, .4, .5, 1, 2]: lower median 0.3
    assert math.isclose(auto_alpha(A, G), 1.0 / 0.3, rel_tol=1e-6)
    # a zero median falls back to the mean (0.25 here); an all-zero G gives alpha 0 (GBLM = Wanda)
    mostly_zero = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    assert math.isclose(auto_alpha(A, mostly_zero), 1.0 / 0.25, rel_tol=1e-6)
    assert auto_alpha(A, torch.zeros_like(G)) == 0.0
