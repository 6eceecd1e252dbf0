"""FisherTune estimation: empirical Fisher vs the analytic one, the DR-FIM formulas on hand-made
values, the VI fixed point, the quantile, and the feature-statistics perturbation x'."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgss.models.backbones import build_backbone
from dgss.tuning.fishertune.drfim import (DomainRelatedFisher, DRFIMOptions, domain_related_fisher, ema_update,
                                          large_quantile, posterior_noise_scale, precision_from_fisher,
                                          round_sizes, variational_domain_related_fisher)
from dgss.tuning.fishertune.fisher import functional_loss, split_per_sample, squared_gradient_sums
from dgss.tuning.fishertune.perturbation import FeatureStatisticsPerturbation


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
        else:  # the batch-mean loss: its gradient is the mean of the per-sample ones
            expected_w += gw.mean(0) ** 2
            expected_b += gb.mean(0) ** 2
    assert count == (15 if per_sample else 3)
    assert sums["weight"].dtype == torch.float32  # float32 accumulation
    torch.testing.assert_close(sums["weight"] / count, (expected_w / count).float(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sums["bias"] / count, (expected_b / count).float(), rtol=1e-6, atol=1e-9)
    # the model's own gradients are untouched
    assert model.weight.grad is None and model.bias.grad is None


def test_split_per_sample_keeps_a_batch_dimension():
    parts = split_per_sample({"image": torch.zeros(3, 2), "label": torch.arange(3), "name": ["a", "b", "c"]})
    assert len(parts) == 3 and parts[1]["image"].shape == (1, 2) and parts[2]["name"] == ["c"]
    assert int(parts[1]["label"]) == 1


def test_drfim_on_hand_made_values_matches_the_spec():
    f_x = torch.tensor([1.0, 0.0, 2.0, 1e-3], dtype=torch.float64)
    f_s = torch.tensor([1.0, 0.5, 1.0, 2e-3], dtype=torch.float64)
    w = math.exp(-1.0)  # e^{-(0.5 + 0.5)}
    expected = torch.tensor([1.0, w * 0.5 / 1e-8, 2.0 + w * 1.0 / (1.0 + 1e-8), 1e-3 + w * 1e-3 / (1e-3 + 1e-8)],
                            dtype=torch.float64)
    torch.testing.assert_close(domain_related_fisher(f_x, f_s), expected, rtol=1e-12, atol=0)
    # other strengths change only the weight of the ratio term
    w2 = math.exp(-0.3)
    got = domain_related_fisher(f_x, f_s, eps_mu=0.1, eps_sigma=0.2, eps=1e-3)
    torch.testing.assert_close(got[2], torch.tensor(2.0 + w2 * 1.0 / (1.0 + 1e-3), dtype=torch.float64))

    lam_x = torch.tensor([3.0, 0.5, 10.0], dtype=torch.float64)
    lam_s = torch.tensor([1.0, 0.5, 12.0], dtype=torch.float64)
    tau, gamma = 0.5, 2.0
    expected = torch.tensor([gamma * (3.0 - tau) + gamma * w * 2.0 / (1.0 + 1e-8),
                             gamma * (0.5 - tau),
                             gamma * (10.0 - tau) + gamma * w * 2.0 / (10.0 + 1e-8)], dtype=torch.float64)
    got = variational_domain_related_fisher(lam_x, lam_s, tau_inv_sq=tau, gamma=gamma)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_ema_converges_to_the_vi_fixed_point():
    fisher, scale, tau = torch.tensor([0.0, 1e-3, 2.0]), 50.0, 0.25
    target = precision_from_fisher(fisher, scale, tau)
    torch.testing.assert_close(target, torch.tensor([0.25, 0.3, 100.25]))
    lam = torch.tensor([7.0, 0.0, 1.0])
    for _ in range(60):
        ema_update(lam, precision_from_fisher(fisher, scale, tau), beta=0.5)
    torch.testing.assert_close(lam, target)


def test_variational_estimate_holds_the_fixed_point_when_the_fisher_is_constant():
    """A loss linear in theta (sum of w . x) has a gradient, hence a Fisher, that does not depend on
    theta: every sampled round must then land on Lambda = N_eff F / gamma + tau^-2 exactly."""
    torch.manual_seed(0)
    model = nn.Linear(6, 2, bias=False).double()
    batches = iter([{"x": torch.randn(4, 6, dtype=torch.float64)} for _ in range(8)])
    chunks = [[], []]  # which batches x and x' saw, to compute F independently

    def forward_loss(params, batch, shifted):
        x = batch["x"] * (3.0 if shifted else 1.0)
        chunks[shifted].append(x)
        return torch.func.functional_call(model, params, (x,)).sum()

    pretrained = {"weight": model.weight.detach()}
    opts = DRFIMOptions(variational=True, rounds=4, gamma=2.0, tau_quantile=0.5, ema_beta=0.5)
    estimator = DomainRelatedFisher(pretrained, forward_loss, opts, n_eff=1000, generator=torch.Generator().manual_seed(0))
    estimate = estimator.estimate(batches, 8)
    assert estimate.passes == 16 and round_sizes(8, 4) == [2, 2, 2, 2]
    scale = 1000 / 2.0
    # analytic Fisher of sum(W x) over a batch: d/dW = 1 (x) sum_b x_b for every output row
    def fisher(xs):
        return torch.stack([x.sum(0).expand(2, 6) ** 2 for x in xs]).mean(0).float()

    f_x, f_s = fisher(chunks[False][:2]), fisher(chunks[True][:2])
    torch.testing.assert_close(estimate.fisher_x["weight"], f_x)
    torch.testing.assert_close(estimate.fisher_shifted["weight"], f_s)
    assert estimate.tau_inv_sq == pytest.approx(torch.quantile((scale * f_x).double().flatten(), 0.5).item(), rel=1e-6)
    # rounds see different batches: Lambda is the EMA (beta = 0.5) of the rounds' fixed-point values
    tau = estimate.tau_inv_sq
    expected = scale * fisher(chunks[False][0:2]) + tau
    for r in (1, 2, 3):
        expected = 0.5 * expected + 0.5 * (scale * fisher(chunks[False][2 * r:2 * r + 2]) + tau)
    torch.testing.assert_close(estimate.precision_x["weight"], expected, rtol=1e-6, atol=0)
    # with one batch for every round, F is constant and Lambda sits on the fixed point:
    same = {"x": torch.randn(4, 6, dtype=torch.float64)}
    estimate = estimator.estimate(iter([same] * 8), 8)
    f_x = fisher([same["x"]])
    torch.testing.assert_close(estimate.precision_x["weight"], scale * f_x + estimate.tau_inv_sq, rtol=1e-6, atol=0)
    torch.testing.assert_close(estimate.precision_shifted["weight"], scale * 9 * f_x + estimate.tau_inv_sq,
                               rtol=1e-6, atol=0)


def test_posterior_samples_are_capped_by_the_noise_cap():
    pretrained = torch.full((1000,), 2.0)
    tiny_precision = torch.full((1000,), 1e-12)  # std 1e6 uncapped
    std = posterior_noise_scale(tiny_precision, pretrained, cap=0.05)
    torch.testing.assert_close(std, torch.full((1000,), 0.1))  # 0.05 x RMS 2.0
    sharp = posterior_noise_scale(torch.full((3,), 1e6), pretrained[:3], cap=0.05)
    torch.testing.assert_close(sharp, torch.full((3,), 1e-3))


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_large_quantile_matches_torch_quantile(q):
    values = torch.rand(1001) ** 3
    assert large_quantile(values, q) == pytest.approx(torch.quantile(values.double(), q).item(), rel=1e-6)


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
