"""Matching and losses of the Mask2Former criterion against explicit, per-mask references."""

import itertools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dgss.models.mask2former import HungarianMatcher, Mask2FormerCriterion, present_classes
from dgss.models.mask2former import criterion as criterion_module
from dgss.models.mask2former.criterion import average_num_masks
from dgss.models.mask2former.point_sample import (
    sample_label_masks,
    sample_label_onehot,
    uncertain_point_coords,
)



def grid_sample_points(maps, coords):
    """N x C x H x W maps at N x P x 2 points in [0, 1] -> N x C x P, with grid_sample as the oracle."""
    return F.grid_sample(maps, 2 * coords[:, None] - 1, align_corners=False).squeeze(2)


def class_mask(labels_2d, cls):
    return (labels_2d == cls).float()


# ------------------------------------------------------------------------------- point sampling


def test_label_point_sampling_equals_grid_sample_of_the_class_masks():
    labels = torch.randint(0, 4, (2, 9, 13))
    labels[0, :3] = 255
    coords = torch.rand(2, 50, 2) * 1.2 - 0.1  # some outside: zero padding
    coords[:, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5 / 13, 0.5 / 9], [1.0, 0.3]])
    onehot = F.one_hot(torch.where(labels == 255, 4, labels), 5)[..., :4].permute(0, 3, 1, 2).float()
    expected = grid_sample_points(onehot, coords).transpose(1, 2)  # B x P x K
    torch.testing.assert_close(sample_label_onehot(labels, coords, 4), expected)
    batch_index, classes = torch.tensor([1, 0, 0]), torch.tensor([2, 3, 0])
    per_mask = sample_label_masks(labels, batch_index, classes, coords[batch_index])
    torch.testing.assert_close(per_mask, expected[batch_index, :, classes])


def test_uncertain_points_are_the_most_uncertain_of_three_times_as_many_candidates():
    logits = torch.randn(2, 16, 16) * 4
    torch.manual_seed(5)
    coords = uncertain_point_coords(logits, num_points=40, oversample_ratio=3, importance_sample_ratio=0.75)
    assert coords.shape == (2, 40, 2)
    torch.manual_seed(5)  # replay the same random stream: 120 candidates, then 10 fresh points
    candidates = torch.rand(2, 120, 2)
    fresh = torch.rand(2, 10, 2)
    candidate_logits = grid_sample_points(logits[:, None], candidates)[:, 0]
    for n in range(2):
        most_uncertain = candidate_logits[n].abs().argsort()[:30]
        expected = candidates[n, most_uncertain]
        assert sorted(map(tuple, coords[n, :30].tolist())) == sorted(map(tuple, expected.tolist()))
    torch.testing.assert_close(coords[:, 30:], fresh)


# ------------------------------------------------------------------------------------- matcher


def reference_cost(logits, masks, labels_2d, cls, coords):
    """Cost of every query for the mask of one class, from the definitions (one image)."""
    probs = logits.softmax(-1)[:, cls]
    pred = grid_sample_points(masks[None], coords[None])[0]  # Q x P
    target = grid_sample_points(class_mask(labels_2d, cls)[None, None], coords[None])[0, 0]  # P
    bce = F.binary_cross_entropy_with_logits(pred, target.expand_as(pred), reduction="none").mean(-1)
    sig = pred.sigmoid()
    dice = 1 - (2 * (sig * target).sum(-1) + 1) / (sig.sum(-1) + target.sum() + 1)
    return -2 * probs + 5 * bce + 5 * dice


def brute_force(cost):
    """Minimum-cost one-to-one matching of rows (queries) to columns (masks) by enumeration."""
    rows, cols = len(cost), len(cost[0])
    best, best_pairs = float("inf"), None
    if rows >= cols:
        for perm in itertools.permutations(range(rows), cols):
            pairs = set(zip(perm, range(cols)))
            total = sum(cost[r][c] for r, c in pairs)
            if total < best:
                best, best_pairs = total, pairs
    else:
        for perm in itertools.permutations(range(cols), rows):
            pairs = set(zip(range(rows), perm))
            total = sum(cost[r][c] for r, c in pairs)
            if total < best:
                best, best_pairs = total, pairs
    return best_pairs


@pytest.mark.parametrize("seed", range(4))
def test_matcher_equals_brute_force_on_costs_from_the_definitions(seed):
    torch.manual_seed(seed)
    num_classes, queries, preds = 6, 4, 2
    labels = torch.randint(0, 3, (3, 16, 20))
    labels[1] = torch.randint(0, 6, (16, 20))  # 5-6 classes for 4 queries: some masks stay unmatched
    labels[2, :, :7] = 255
    labels[2, :, 7:] = 4  # one class and an ignored region
    logits = [torch.randn(3, queries, num_classes + 1) for _ in range(preds)]
    masks = [torch.randn(3, queries, 4, 5) * 3 for _ in range(preds)]
    coords = torch.rand(preds, 3, 300, 2)
    matcher = HungarianMatcher(num_points=300)
    assignment = matcher(logits, masks, labels, num_classes, point_coords=coords)
    present = present_classes(labels, num_classes)
    assert present[2].tolist() == [False, False, False, False, True, False]
    got = set(zip(assignment.prediction.tolist(), assignment.batch.tolist(), assignment.query.tolist(),
                  assignment.target_class.tolist()))
    expected = set()
    for p, b in itertools.product(range(preds), range(3)):
        classes = labels[b].unique()
        classes = classes[classes != 255].tolist()
        cost = torch.stack([reference_cost(logits[p][b], masks[p][b], labels[b], c, coords[p, b]) for c in classes], 1)
        expected |= {(p, b, q, classes[col]) for q, col in brute_force(cost.tolist())}
    assert got == expected
    assert assignment.num_masks == sum(min(queries, int(present[b].sum())) for b in range(3))
    assert len(got) == preds * assignment.num_masks


# ------------------------------------------------------------------------------------ criterion


def test_criterion_equals_the_loss_definitions(monkeypatch):
    """Two predictions, an unambiguous matching, fixed loss points: every term by hand."""
    torch.manual_seed(0)
    num_classes, queries = 3, 4
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[0, :, 16:] = 2
    labels[0, :4] = 255
    labels[1, 8:24, 8:24] = 1
    # Queries 0 and 1 predict the present classes confidently with good masks; 2 and 3 predict nothing.
    truth = {0: {0: 0, 1: 2}, 1: {0: 0, 1: 1}}  # image -> query -> class
    predictions = []
    for _ in range(2):
        logits = torch.randn(2, queries, num_classes + 1)
        masks = torch.randn(2, queries, 8, 8)
        for b, per_query in truth.items():
            small = F.interpolate(labels[b][None, None].float(), size=(8, 8), mode="nearest")[0, 0]
            for q, c in per_query.items():
                logits[b, q, c] += 6
                masks[b, q] = torch.where(small == c, 4.0, -4.0) + 0.5 * torch.randn(8, 8)
        predictions.append({"pred_logits": logits.requires_grad_(), "pred_masks": masks.requires_grad_()})
    outputs = {**predictions[1], "aux_outputs": [predictions[0]]}

    points = torch.rand(4 * 2, 200, 2)  # 2 matched masks per image, 2 images, 2 predictions
    monkeypatch.setattr(criterion_module, "uncertain_point_coords", lambda m, *a: points[: m.shape[0]])
    criterion = Mask2FormerCriterion(num_classes, num_points=200)
    losses = criterion(outputs, labels)

    weights = torch.tensor([1.0, 1.0, 1.0, 0.1])
    exp_cls = exp_mask = exp_dice = 0.0
    n = 0
    for pred in predictions:
        targets = torch.full((2, queries), num_classes)
        for b, per_query in truth.items():
            for q, c in per_query.items():
                targets[b, q] = c
        exp_cls += F.cross_entropy(pred["pred_logits"].flatten(0, 1), targets.flatten(), weight=weights)
        for b, per_query in truth.items():
            for q, c in per_query.items():
                coords = points[n:n + 1]
                logit = grid_sample_points(pred["pred_masks"][b, q][None, None], coords)[0, 0]
                target = grid_sample_points(class_mask(labels[b], c)[None, None], coords)[0, 0]
                exp_mask += F.binary_cross_entropy_with_logits(logit, target)
                sig = logit.sigmoid()
                exp_dice += 1 - (2 * (sig * target).sum() + 1) / (sig.sum() + target.sum() + 1)
                n += 1
    num_masks = 4  # target masks per prediction (2 + 2)
    torch.testing.assert_close(losses["loss_cls"], 2 * exp_cls)
    torch.testing.assert_close(losses["loss_mask"], 5 * exp_mask / num_masks)
    torch.testing.assert_close(losses["loss_dice"], 5 * exp_dice / num_masks)


def test_criterion_without_any_labelled_pixel_gives_zero_mask_losses_and_a_graph():
    criterion = Mask2FormerCriterion(3, num_points=50)
    logits = torch.randn(2, 4, 4, requires_grad=True)
    masks = torch.randn(2, 4, 8, 8, requires_grad=True)
    losses = criterion({"pred_logits": logits, "pred_masks": masks, "aux_outputs": []},
                       torch.full((2, 32, 32), 255))
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    # Every query is "no object": the mean cross-entropy with weight 0.1 everywhere is the plain mean.
    expected = F.cross_entropy(logits.flatten(0, 1), torch.full((8,), 3))
    torch.testing.assert_close(losses["loss_cls"], 2 * expected)
    sum(losses.values()).backward()
    assert masks.grad is not None and logits.grad is not None


def test_criterion_treats_an_in_range_ignore_index_as_no_class():
    criterion = Mask2FormerCriterion(3, num_points=50)
    logits, masks = torch.randn(1, 4, 4), torch.randn(1, 4, 8, 8)
    outputs = {"pred_logits": logits, "pred_masks": masks, "aux_outputs": []}
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    losses = criterion(outputs, labels, ignore_index=0)  # the only class is ignored: no target
    assert losses["loss_mask"].item() == 0


def _average_in_process(rank, world_size, init_file, counts, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results[rank] = [average_num_masks(c[rank], torch.device("cpu")).item() for c in counts]
    finally:
        dist.destroy_process_group()


def test_number_of_masks_is_averaged_over_processes_and_clamped():
    assert average_num_masks(0, torch.device("cpu")).item() == 1.0  # not distributed: clamped count
    assert average_num_masks(7, torch.device("cpu")).item() == 7.0
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        counts = [(0, 3), (0, 1)]  # per call: (rank 0's count, rank 1's count)
        # fork: the children need no fresh interpreter (spawn would re-import torch, seconds each)
        mp.start_processes(_average_in_process, args=(2, os.path.join(tmp, "init"), counts, results), nprocs=2,
                           join=True, start_method="fork")
        assert results[0] == results[1] == [1.5, 1.0]  # mean 0.5 is clamped to 1
