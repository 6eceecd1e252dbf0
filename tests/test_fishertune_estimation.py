"""FisherTune estimation: the empirical Fisher against the analytic one, the DR-FIM scores on hand-made
values, the variational estimate (prior, data scale, per-batch posterior updates at theta ~ q), the
binding properties of fishertune.md §3 (scale-free, both terms shape the ranking, the posterior is
used), and the feature-statistics perturbation x'."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgss.models.backbones import build_backbone
from dgss.tuning.fishertune.drfim import (DomainRelatedFisher, DRFIMOptions, FisherEstimate, domain_scores,
                                          large_quantile, prior_precisions, selection_scores, shift_weight,
                                          task_scores, threshold_scale)
from dgss.tuning.fishertune.fisher import functional_loss, split_per_sample, squared_gradient_sums
from dgss.tuning.fishertune.perturbation import FeatureStatisticsPerturbation
from dgss.tuning.fishertune.report import jaccard, top_positions


def softmax_problem(num_batches=3, batch=5, dim=4, classes=3):
    torch.manual_seed(1)
    model = nn.Linear(dim, classes).double()
    batches = [{"x": torch.randn(batch, dim, dtype=torch.float64), "y": torch.randint(0, classes, (batch,))}
               for _ in range(num_batches)]
    forward_loss = functional_loss(model, "", lambda call, b: F.cross_entropy(call(b["x"]), b["y"]))
    params = {n: p.detach() for n, p in model.named_parameters()}
    return model, batches, forward_loss, params


def analytic_gradients(model, x, y):
    """Per-sample gradients of the cross-entropy of a linear softmax classifier: (p - e_y) x^T, p - e_y."""
    with torch.no_grad():
        residual = torch.softmax(model(x), -1) - F.one_hot(y, model.out_features).double()  # B x C
    return residual[:, :, None] * x[:, None, :], residual  # B x C x D, B x C


@pytest.mark.parametrize("per_sample", [False, True])
def test_empirical_fisher_of_a_softmax_classifier_equals_the_analytic_one(per_sample):
    model, batches, forward_loss, params = softmax_problem()
    sums, count = squared_gradient_sums(forward_loss, params, batches, per_sample=per_sample)
    expected_w, expected_b = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    for b in batches:
        gw, gb = analytic_gradients(model, b["x"], b["y"])
        if per_sample:
            expected_w += (gw ** 2).sum(0)
            expected_b += (gb ** 2).sum(0)
        else:  # the batch-mean loss: its gradient is the mean of the per-sample ones; squared, times B
            expected_w += 5 * gw.mean(0) ** 2
            expected_b += 5 * gb.mean(0) ** 2
    assert count == (15 if per_sample else 3)
    assert sums["weight"].dtype == torch.float32  # float32 accumulation
    torch.testing.assert_close(sums["weight"] / count, (expected_w / count).float(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sums["bias"] / count, (expected_b / count).float(), rtol=1e-6, atol=1e-9)
    # the model's own gradients are untouched
    assert model.weight.grad is None and model.bias.grad is None


def test_batch_fisher_times_b_estimates_the_per_sample_fisher_for_independent_samples():
    """For i.i.d. zero-mean per-sample gradients, E[B * (mean gradient)^2] is the per-sample Fisher: the
    scale of per_sample=False matches per_sample=True, so a ratio of the two is about 1, not about 1/B."""
    torch.manual_seed(0)
    weight = torch.zeros(50, dtype=torch.float64)
    batches = [{"x": torch.randn(8, 50, dtype=torch.float64)} for _ in range(400)]
    forward_loss = lambda p, b: (b["x"] @ p["w"]).mean()  # noqa: E731
    # d loss_i / dw = x_i: per-sample Fisher E[x^2] = 1 per entry
    per_batch, n = squared_gradient_sums(forward_loss, {"w": weight}, batches, per_sample=False)
    ratio = (per_batch["w"] / n).mean()
    assert abs(float(ratio) - 1.0) < 0.05


def test_split_per_sample_keeps_a_batch_dimension():
    parts = split_per_sample({"image": torch.zeros(3, 2), "label": torch.arange(3), "name": ["a", "b", "c"]})
    assert len(parts) == 3 and parts[1]["image"].shape == (1, 2) and parts[2]["name"] == ["c"]
    assert int(parts[1]["label"]) == 1


# ---------------------------------------------------------------------------------------------- scores


def plain_estimate(f_x, f_s):
    return FisherEstimate({"a": torch.tensor(f_x)}, {"a": torch.tensor(f_s)})


def test_threshold_scale_is_the_value_at_the_top_fraction():
    scores = {"a": torch.arange(10.0), "b": torch.arange(10.0, 20.0)}
    assert threshold_scale(scores, 0.1) == 18.0  # top 2 of 20: 19, 18
    assert threshold_scale(scores, 0.5) == 10.0
    assert threshold_scale({"a": torch.tensor([0.0, 0.0, 0.0, 4.0])}, 0.5) == 1.0  # threshold 0 -> the mean
    assert threshold_scale({"a": torch.zeros(4)}, 0.5) == 1.0


def test_drfim_on_hand_made_values_is_the_sum_of_the_two_terms_in_threshold_units():
    f_x = [4.0, 1.0, 2.0, 0.0, 8.0]
    f_s = [4.0, 3.0, 1.0, 0.5, 4.0]
    est = plain_estimate(f_x, f_s)
    opts = DRFIMOptions(variational=False, eps_mu=0.2, eps_sigma=0.3, domain_balance=2.0, ratio_eps=1e-3,
                        normalization="global")
    floor = 1e-3 * 3.75  # relative eps: the mean of the nonzero F(x) (4, 1, 2, 8)
    domain = torch.tensor([0.0, 2.0 / (1 + floor), 1.0 / (1 + floor), 0.5 / floor, 4.0 / (4 + floor)])
    torch.testing.assert_close(domain_scores(est, 1e-3)["a"], domain)
    torch.testing.assert_close(task_scores(est)["a"], torch.tensor(f_x))
    got = selection_scores(est, "drfim", opts, fraction=0.4)["a"]
    task_unit = 4.0  # top 2 of 5 task values: 8, 4
    domain_unit = float(torch.sort(domain, descending=True).values[1])
    expected = torch.tensor(f_x) / task_unit + 2.0 * math.exp(-0.5) * domain / domain_unit
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(selection_scores(est, "fisher", opts, 0.4)["a"], torch.tensor(f_x))
    torch.testing.assert_close(selection_scores(est, "domain", opts, 0.4)["a"], domain)
    with pytest.raises(ValueError, match="unknown score mode"):
        selection_scores(est, "random", opts, 0.4)


def test_variational_domain_term_is_the_relative_change_of_the_precision_and_the_prior_shrinks_it():
    prior = {"a": 4.0}
    est = FisherEstimate({"a": torch.tensor([2.0, 2e-3, 10.0])}, {"a": torch.tensor([1.0, 1e-3, 10.0])},
                         prior_precision=prior, gamma={"a": 0.5})
    lam_x, lam_s = torch.tensor([8.0, 4.004, 24.0]), torch.tensor([6.0, 4.002, 24.0])
    torch.testing.assert_close(est.precision("a"), lam_x)
    torch.testing.assert_close(domain_scores(est)["a"], (lam_x - lam_s).abs() / torch.minimum(lam_x, lam_s))
    # the same relative change of F (x2) scores ~0 where the prior dominates, ~1/3 where the data does
    assert domain_scores(est)["a"][1] < 1e-3 < domain_scores(est)["a"][0]
    assert est.prior_dominated_share() == pytest.approx(1 / 3)  # F / gamma < 4 only for the middle entry
    # the task term is F (= gamma (Lambda - tau^-2)), whatever the prior
    torch.testing.assert_close(task_scores(est)["a"], 0.5 * (est.precision("a") - 4.0))


def test_tensor_normalisation_divides_each_tensor_by_its_mean():
    est = FisherEstimate({"big": torch.tensor([100.0, 300.0]), "small": torch.tensor([1.0, 2.0, 3.0])}, None)
    got = task_scores(est, "tensor")
    torch.testing.assert_close(got["big"], torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(got["small"], torch.tensor([0.5, 1.0, 1.5]))


def test_prior_is_relative_per_tensor_with_a_fallback_for_zero_tensors():
    pretrained = {"w": torch.full((4, 4), 2.0), "b": torch.zeros(4)}
    prior = prior_precisions(pretrained, rho=0.1)
    assert prior["w"] == pytest.approx(1 / (0.1 * 2.0) ** 2)
    overall = math.sqrt(16 * 4.0 / 20)  # RMS over all 20 eligible entries
    assert prior["b"] == pytest.approx(1 / (0.1 * overall) ** 2)
    with pytest.raises(ValueError, match="prior_rho"):
        prior_precisions(pretrained, rho=0.0)


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_large_quantile_matches_torch_quantile(q):
    values = torch.rand(1001) ** 3
    assert large_quantile(values, q) == pytest.approx(torch.quantile(values.double(), q).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- estimator


def linear_problem(num_batches=6, batch=4, shift=3.0):
    """A loss linear in theta (sum of W x): its per-sample gradients, hence its Fisher, do not depend on
    theta, so the variational estimate has an exact answer."""
    torch.manual_seed(0)
    model = nn.Linear(6, 2, bias=False).double()
    data = [{"x": torch.randn(batch, 6, dtype=torch.float64)} for _ in range(num_batches)]
    seen = []  # (params, shifted) of every pass

    def forward_loss(params, batch, shifted):
        seen.append(({n: p.detach().clone() for n, p in params.items()}, shifted))
        x = batch["x"] * (shift if shifted else 1.0)
        return torch.func.functional_call(model, params, (x,)).sum()

    return model, data, forward_loss, seen


def per_sample_fisher(xs):
    """Per-sample Fisher of sum(W x) over images: (x_i)^2 for every output row, averaged."""
    x = torch.cat(xs)
    return (x ** 2).mean(0).expand(2, 6).float()


def test_variational_estimate_updates_the_posterior_every_batch_at_a_sample_of_it():
    model, data, forward_loss, seen = linear_problem()
    pretrained = {"weight": model.weight.detach()}
    opts = DRFIMOptions(variational=True, prior_rho=0.05, prior_quantile=0.5)
    estimator = DomainRelatedFisher(pretrained, forward_loss, opts, generator=torch.Generator().manual_seed(0))
    estimate = estimator.estimate(iter(data), len(data))
    assert estimate.passes == 2 * 6 * 4  # per image, x and x'
    tau_inv_sq = 1 / (0.05 * float(pretrained["weight"].pow(2).mean().sqrt())) ** 2
    assert estimate.prior_precision["weight"] == pytest.approx(tau_inv_sq)
    # gamma: data precision F / gamma = prior precision at the median of tau^2 F_bar (all batches)
    def gamma_after(t):
        return large_quantile((per_sample_fisher([d["x"] for d in data[:t]]) / tau_inv_sq).flatten(), 0.5)

    assert estimate.gamma["weight"] == pytest.approx(gamma_after(len(data)), rel=1e-5)
    # Lambda after all batches: the running mean of the batches' targets = F_bar / gamma + tau^-2
    torch.testing.assert_close(estimate.fisher_x["weight"], per_sample_fisher([d["x"] for d in data]))
    torch.testing.assert_close(estimate.fisher_shifted["weight"], 9 * per_sample_fisher([d["x"] for d in data]))
    torch.testing.assert_close(estimate.precision("weight"),
                               estimate.fisher_x["weight"] / estimate.gamma["weight"] + tau_inv_sq)
    # Every pass of batch t (0-based) ran at one theta ~ q_x after t batches, x and x' alike: theta_pt +
    # z / sqrt(Lambda) with z the generator's next standard-normal draw, Lambda = F_bar / gamma + tau^-2
    # (batch 0: the prior alone), gamma as last re-measured (after batch 1, 2, 4, ...).
    theta_pt = pretrained["weight"]
    draws = torch.Generator().manual_seed(0)
    for t in range(len(data)):
        passes = seen[t * 8:(t + 1) * 8]
        assert [s for _, s in passes] == [False] * 4 + [True] * 4
        thetas = [p["weight"] for p, _ in passes]
        assert all(torch.equal(thetas[0], th) for th in thetas)
        if t:
            gamma = gamma_after(1 << (t.bit_length() - 1))  # the last power of 2 <= t
            lam_x = per_sample_fisher([d["x"] for d in data[:t]]) / gamma + tau_inv_sq
        else:
            lam_x = torch.full((2, 6), tau_inv_sq)
        z = torch.randn((2, 6), generator=draws)
        torch.testing.assert_close((thetas[0] - theta_pt).float() * lam_x.sqrt(), z, rtol=1e-4, atol=1e-4)


def test_posterior_noise_follows_the_fisher_and_never_exceeds_the_prior():
    """Entries with a large Fisher are sampled narrowly, entries the data does not inform at the prior's
    width tau (no clamp: the prior bounds it)."""
    pretrained = {"w": torch.ones(2, 5000)}
    estimator = DomainRelatedFisher(pretrained, None, DRFIMOptions(prior_rho=0.1),
                                    generator=torch.Generator().manual_seed(0))
    prior = prior_precisions(pretrained, 0.1)  # tau = 0.1
    sums = {"w": torch.stack([torch.full((5000,), 99.0), torch.zeros(5000)])}  # F / gamma = 99 tau^-2, 0
    theta = estimator.sample_parameters(sums, count=1, gamma={"w": 1 / prior["w"]}, prior=prior)
    spread = (theta["w"] - 1.0).std(dim=1)
    assert spread[0] == pytest.approx(0.01, rel=0.05)  # Lambda = 100 tau^-2: std tau / 10
    assert spread[1] == pytest.approx(0.1, rel=0.05)  # the prior: std tau


def mlp_problem(loss_scale=1.0, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    torch.manual_seed(100)
    data = [{"x": torch.randn(4, 8), "y": torch.randint(0, 3, (4,))} for _ in range(12)]
    drift = torch.linspace(-1, 1, 8)

    def forward_loss(params, batch, shifted):
        x = batch["x"] * 1.5 + drift if shifted else batch["x"]  # a fixed "domain shift" of the inputs
        return loss_scale * F.cross_entropy(torch.func.functional_call(model, params, (x,)), batch["y"])

    pretrained = {n: p.detach() for n, p in model.named_parameters()}
    return pretrained, data, forward_loss


def selection(pretrained, data, forward_loss, options, mode="drfim", fraction=0.1):
    estimator = DomainRelatedFisher(pretrained, forward_loss, options, generator=torch.Generator().manual_seed(3))
    estimate = estimator.estimate(iter(data), len(data))
    scores = selection_scores(estimate, mode, options, fraction)
    k = round(fraction * sum(p.numel() for p in pretrained.values()))
    return top_positions(list(scores.values()), k)


@pytest.mark.parametrize("variational", [True, False])
def test_selection_does_not_depend_on_the_loss_scale(variational):
    options = DRFIMOptions(variational=variational)
    reference = selection(*mlp_problem(1.0), options)
    for scale in (10.0, 0.1):
        assert jaccard(reference, selection(*mlp_problem(scale), options)) >= 0.99


def test_per_sample_selection_does_not_depend_on_the_estimation_batch_size():
    pretrained, data, forward_loss = mlp_problem()
    regrouped = [{"x": torch.cat([data[i]["x"], data[i + 1]["x"]]), "y": torch.cat([data[i]["y"], data[i + 1]["y"]])}
                 for i in range(0, len(data), 2)]  # the same 48 images in batches of 8
    options = DRFIMOptions(variational=False)
    assert jaccard(selection(pretrained, data, forward_loss, options),
                   selection(pretrained, regrouped, forward_loss, options)) >= 0.99


def test_both_terms_shape_the_drfim_and_the_balance_moves_it_between_them():
    pretrained, data, forward_loss = mlp_problem()
    overlaps = {}
    for balance in (0.0, 1.0, 100.0):
        options = DRFIMOptions(domain_balance=balance)
        chosen = selection(pretrained, data, forward_loss, options)
        overlaps[balance] = (jaccard(chosen, selection(pretrained, data, forward_loss, options, "fisher")),
                             jaccard(chosen, selection(pretrained, data, forward_loss, options, "domain")))
    assert overlaps[0.0][0] == 1.0  # balance 0: the task term alone
    assert overlaps[100.0][1] > 0.9  # a large balance: (nearly) the domain term alone
    fim, domain = overlaps[1.0]
    assert fim < 0.9 and domain < 0.9 and fim + domain > 0.5


def test_estimate_refuses_an_empty_budget_and_a_bad_quantile():
    pretrained, data, forward_loss = mlp_problem()
    with pytest.raises(ValueError, match="num_batches"):
        DomainRelatedFisher(pretrained, forward_loss, DRFIMOptions()).estimate(iter(data), 0)
    with pytest.raises(ValueError, match="prior_quantile"):
        DRFIMOptions(prior_quantile=1.0)
    with pytest.raises(ValueError, match="normalization"):
        DRFIMOptions(normalization="block")


def test_shift_weight_and_the_estimators_defaults_are_the_configs():
    from dgss.config import FisherTuneConfig

    assert shift_weight(0.5, 0.5) == pytest.approx(math.exp(-1))
    config = dataclasses.asdict(FisherTuneConfig())
    assert all(config[key] == value for key, value in dataclasses.asdict(DRFIMOptions()).items())


# ---------------------------------------------------------------------------------------------- x'


def test_perturbation_shifts_the_patch_token_statistics_as_the_spec_says():
    backbone = build_backbone("dinov2_s", img_size=64, depth=2, embed_dim=32, num_heads=2)
    shift = FeatureStatisticsPerturbation(backbone, [0], eps_mu=0.5, eps_sigma=0.3)
    seen = []
    backbone.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        backbone(images)
        with shift.active(torch.Generator().manual_seed(5)):
            backbone(images)
    clean, shifted = seen
    prefix = backbone.num_prefix_tokens
    assert torch.equal(clean[:, :prefix], shifted[:, :prefix])  # class token untouched
    z = torch.randn((2, 2, 1, 32), generator=torch.Generator().manual_seed(5))
    patches = clean[:, prefix:]
    mu, sigma = patches.mean(1, keepdim=True), patches.std(1, unbiased=False, keepdim=True)
    # statistics of x' per sample and channel: mu' = mu + eps_mu sigma z1, sigma' = sigma |1 + eps_sigma z2|
    out = shifted[:, prefix:]
    torch.testing.assert_close(out.mean(1, keepdim=True), mu + 0.5 * sigma * z[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.std(1, unbiased=False, keepdim=True), sigma * (1 + 0.3 * z[1]).abs(),
                               rtol=1e-3, atol=1e-4)
    assert not shift.enabled
    with torch.no_grad():
        backbone(images)
    assert torch.equal(seen[-1], clean)  # off again outside the context
    assert shift.shift_weight == pytest.approx(math.exp(-0.8))


def _estimate_in_process(rank, world_size, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        pretrained, data, forward_loss = mlp_problem()
        shard = [{k: v[2 * rank:2 * rank + 2] for k, v in b.items()} for b in data]  # 2 of each batch's 4
        estimator = DomainRelatedFisher(pretrained, forward_loss, DRFIMOptions(),
                                        generator=torch.Generator().manual_seed(3))
        estimate = estimator.estimate(iter(shard), len(shard))
        results[rank] = ({n: f.clone() for n, f in estimate.fisher_x.items()},
                         {n: f.clone() for n, f in estimate.fisher_shifted.items()}, dict(estimate.gamma))
    finally:
        dist.destroy_process_group()


def test_two_processes_estimate_what_one_process_estimates_from_their_union():
    """Under torch.distributed every batch's per-sample sums are reduced over the processes before the
    posterior moves, and every process draws the same theta: two processes with half of each batch give
    one process's estimate of the whole batches (sampled weights, data scale and Fisher alike)."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    pretrained, data, forward_loss = mlp_problem()
    alone = DomainRelatedFisher(pretrained, forward_loss, DRFIMOptions(), generator=torch.Generator().manual_seed(3))
    expected = alone.estimate(iter(data), len(data))
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.start_processes(_estimate_in_process, args=(2, os.path.join(tmp, "init"), results), nprocs=2, join=True,
                           start_method="fork")
        fisher_x, fisher_s, gamma = results[0]
    for name in expected.fisher_x:
        torch.testing.assert_close(fisher_x[name], expected.fisher_x[name], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(fisher_s[name], expected.fisher_shifted[name], rtol=1e-4, atol=1e-9)
        assert gamma[name] == pytest.approx(expected.gamma[name], rel=1e-4)
    assert results[1][2] == gamma  # both processes hold the same posterior
