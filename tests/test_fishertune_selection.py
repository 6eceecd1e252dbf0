"""FisherTune selection: the DINOv2-L count, global top-k, the schedule, monotone growth, re-ranking."""

import pytest
import torch

from dgss.config import MethodConfig
from dgss.models.backbones import build_backbone
from dgss.tuning import build_method
from dgss.tuning.fishertune.selection import (active_count, rank_top_entries, rerank_inactive, selected_mask,
                                              selection_count, tuned_fraction)


def test_five_percent_of_dinov2_large_is_15209933_entries():
    with torch.device("meta"):  # shapes only: no memory, no data
        backbone = build_backbone("dinov2_l")  # 512, patch 16
        method = build_method(MethodConfig(name="fishertune"), backbone)
    assert method.num_eligible == 304_198_656
    assert method.capacity == 15_209_933 == method.num_trainable_backbone_parameters()
    assert method.delta.numel() == 15_209_933
    assert selection_count(304_198_656, 0.05) == 15_209_933
    assert selection_count(304_198_656, 0.01) == 3_041_987  # delta_min: 3,041,986.56 rounded


def test_global_top_k_matches_a_brute_force_ranking():
    torch.manual_seed(3)
    scores = [torch.rand(4, 5), torch.rand(7), torch.rand(2, 3, 2)]
    sel = rank_top_entries(scores, 9)
    flat = torch.cat([s.flatten() for s in scores])
    best = torch.argsort(flat, descending=True)[:9]
    starts = [0, 20, 27]
    got = {}
    offset = 0
    for t, count in enumerate(sel.counts.tolist()):
        for local, rank in zip(sel.index[offset:offset + count].tolist(), sel.rank[offset:offset + count].tolist()):
            got[starts[t] + local] = rank
        offset += count
        assert sel.index[offset - count:offset].tolist() == sorted(sel.index[offset - count:offset].tolist())
    assert got == {int(p): r for r, p in enumerate(best)}
    assert int(sel.counts.sum()) == 9


def test_schedule_grows_from_delta_min_to_delta_max_monotonically():
    total, n = 1000, 1_000_000
    counts = [active_count(t, total, n, delta_min=0.01, delta_max=0.05, tau_frac=0.2) for t in range(total)]
    assert counts[0] == 10_000 and counts == sorted(counts)
    assert tuned_fraction(200, total, 0.01, 0.05, 0.2) == pytest.approx(0.05 - 0.04 * 2.718281828 ** -1)
    assert counts[-1] == round((0.05 - 0.04 * 2.718281828459045 ** (-999 / 200)) * n) and max(counts) <= 50_000
    assert active_count(5, 0, n, delta_min=0.01, delta_max=0.05, tau_frac=0.2) == 50_000


def test_active_sets_are_nested_and_rerank_keeps_the_active_entries():
    torch.manual_seed(0)
    scores = [torch.rand(50), torch.rand(10, 5)]
    sel = rank_top_entries(scores, 30)
    masks = [torch.cat([selected_mask(torch.Size([50]), sel.index[:int(sel.counts[0])], sel.rank[:int(sel.counts[0])], k).flatten(),
                        selected_mask(torch.Size([10, 5]), sel.index[int(sel.counts[0]):], sel.rank[int(sel.counts[0]):], k).flatten()])
             for k in (5, 12, 30)]
    assert all(bool((a <= b).all()) for a, b in zip(masks, masks[1:]))
    new_scores = [torch.rand(50), torch.rand(10, 5)]
    rank = rerank_inactive(sel, new_scores, 12)
    assert torch.equal(rank[sel.rank < 12], sel.rank[sel.rank < 12])
    assert sorted(rank.tolist()) == list(range(30))
    flat_new = torch.cat([s.flatten() for s in new_scores])
    positions = torch.cat([sel.index[:int(sel.counts[0])], 50 + sel.index[int(sel.counts[0]):]])
    inactive = rank >= 12
    order = torch.argsort(rank[inactive])
    ranked_scores = flat_new[positions[inactive]][order]
    assert torch.all(ranked_scores[:-1] >= ranked_scores[1:])
