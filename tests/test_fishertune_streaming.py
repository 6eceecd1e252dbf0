"""FisherTune's reduced-memory estimate (issue 24): streamed squared gradients, scores one tensor at a time
with a running top-k; the same sums, the same scores and the same selection as the dense fp32 reference
on every backbone family dgss builds (tiny), with less memory."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_overrides
from dgss.config import load_config
from dgss.data.synthetic import generate
from dgss.tuning.model import build_segmentor
from dgss.tuning.fishertune.drfim import DomainRelatedFisher, DRFIMOptions, selection_scores, threshold_scale
from dgss.tuning.fishertune.fisher import squared_gradient_sums
from dgss.tuning.fishertune.report import jaccard, selection_positions
from dgss.tuning.fishertune.selection import rank_top_entries, rerank_inactive
from dgss.tuning.fishertune.streaming import RunningTopK, ScoreList, TensorScores, streamed_top_entries


def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    torch.manual_seed(100)
    data = [{"x": torch.randn(4, 8), "y": torch.randint(0, 3, (4,))} for _ in range(6)]
    drift = torch.linspace(-1, 1, 8)

    def forward_loss(params, batch, shifted):
        x = batch["x"] * 1.5 + drift if shifted else batch["x"]
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), batch["y"])

    return model, {n: p.detach() for n, p in model.named_parameters()}, data, forward_loss


@pytest.mark.parametrize("per_sample", [False, True])
def test_streamed_squared_gradients_are_the_dense_ones_bit_for_bit(per_sample):
    model, params, data, forward_loss = mlp_problem()
    loss = lambda p, b: forward_loss(p, b, False)  # noqa: E731
    dense, n_dense = squared_gradient_sums(loss, params, data, per_sample=per_sample)
    streamed, n_streamed = squared_gradient_sums(loss, params, data, per_sample=per_sample, streamed=True)
    assert n_dense == n_streamed == (24 if per_sample else 6)
    for name in dense:
        assert torch.equal(dense[name], streamed[name]), name
    assert all(p.grad is None for p in model.parameters())  # nothing else got a gradient


def test_streamed_pass_skips_a_non_finite_loss_and_stops_at_a_non_finite_gradient():
    batch = {"v": torch.tensor([[1.0, float("inf"), 1.0]])}
    with pytest.warns(UserWarning, match="non-finite loss"):
        sums, count = squared_gradient_sums(lambda p, b: (p["w"] * b["v"][0]).sum(), {"w": torch.ones(3)}, [batch],
                                            streamed=True)
    assert count == 0 and torch.equal(sums["w"], torch.zeros(3))
    # a finite loss with a non-finite gradient (0 x sqrt'(0) = 0 x inf)
    with pytest.raises(FloatingPointError, match="'w'.*estimate_memory=dense"):
        squared_gradient_sums(lambda p, b: p["w"].sqrt().sum() * 0.0, {"w": torch.zeros(3)}, [batch], streamed=True)


@pytest.mark.parametrize("variational", [True, False])
@pytest.mark.parametrize("mode", ["drfim", "fisher", "domain"])
@pytest.mark.parametrize("normalization", ["tensor", "global"])
def test_tensor_scores_are_the_dense_scores(variational, mode, normalization):
    _, params, data, forward_loss = mlp_problem()
    options = DRFIMOptions(variational=variational, normalization=normalization)
    estimate = DomainRelatedFisher(params, forward_loss, options, generator=torch.Generator().manual_seed(3)) \
        .estimate(iter(data), len(data))
    dense = selection_scores(estimate, mode, options, 0.1)
    lazy = TensorScores(estimate, mode, options, 0.1)
    assert list(lazy) == list(dense)
    for name, values in dense.items():
        torch.testing.assert_close(lazy[name], values, rtol=1e-6, atol=0.0)
        if variational or mode == "fisher":  # no float64 mean involved: the same arithmetic, the same bits
            assert torch.equal(lazy[name], values), name
    if mode == "drfim":
        from dgss.tuning.fishertune.drfim import task_scores
        assert lazy.task_unit == threshold_scale(task_scores(estimate, normalization), 0.1)


def test_running_top_k_and_streamed_top_entries_equal_the_dense_ranking():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randn(5, 7, generator=gen), torch.randn(3, generator=gen), torch.randn(11, 4, generator=gen)]
    top = RunningTopK(9)
    start = 0
    for s in scores:
        top.add(s, start)
        start += s.numel()
    flat = torch.cat([s.reshape(-1) for s in scores])
    assert top.kth_value() == float(torch.topk(flat, 9).values.min())
    assert torch.equal(top.best_first(), torch.topk(flat, 9, sorted=True).indices)
    names = ["a", "b", "c"]
    for k in (0, 1, 20, flat.numel()):
        dense = rank_top_entries(scores, k)
        streamed = streamed_top_entries(dict(zip(names, scores)), names, k)
        for field in ("counts", "index", "rank"):
            assert torch.equal(getattr(dense, field), getattr(streamed, field)), (k, field)
    new = [torch.randn(s.shape, generator=gen) for s in scores]
    sel = rank_top_entries(scores, 20)
    lazy = ScoreList(dict(zip(names, new)), names)
    assert torch.equal(rerank_inactive(sel, lazy, 5), rerank_inactive(sel, new, 5))
    with pytest.raises(FloatingPointError, match="'b'"):
        streamed_top_entries({"a": scores[0], "b": torch.tensor([float("nan")])}, ["a", "b"], 3)


MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def synthetic_batches(seed=0):
    i = 0
    while True:
        images, labels = [], []
        for j in range(2):
            image, label = generate("textured", seed + 2 * i + j, (64, 64))
            images.append((torch.from_numpy(image).permute(2, 0, 1).float() - MEAN) / STD)
            labels.append(torch.from_numpy(label).long())
        yield {"image": torch.stack(images), "label": torch.stack(labels)}
        i += 1


def fishertune_model(backbone, memory, *extra):
    kwargs = "{" + ", ".join(f"{k}: {list(v) if isinstance(v, tuple) else v}"
                             for k, v in tiny_overrides(backbone).items()) + "}"
    cfg = load_config(None, [f"model.backbone={backbone}", "model.img_size=64", f"model.backbone_kwargs={kwargs}",
                             "model.head.type=fpn", "model.head.hidden_dim=16", "method.name=fishertune",
                             "method.fishertune.num_batches=3", f"method.fishertune.estimate_memory={memory}",
                             *extra])
    torch.manual_seed(0)
    return build_segmentor(cfg).train()


@pytest.mark.parametrize("backbone,extra", [
    ("dinov2_s", ()), ("dinov3_7b", ()), ("eva02_l", ()), ("sam_b", ()), ("convnext_l", ()),
    ("dinov2_s", ("method.fishertune.variational=false",)),
    ("dinov2_s", ("method.fishertune.selection=domain", "method.fishertune.normalization=global")),
])
def test_the_streamed_estimate_selects_what_the_fp32_reference_selects(backbone, extra):
    selections = {}
    for memory in ("dense", "streamed"):
        model = fishertune_model(backbone, memory, *extra)
        scores = model.method.estimate(model, synthetic_batches(), seed=0)
        assert isinstance(scores, TensorScores) == (memory == "streamed")
        model.method.select(scores, seed=0)
        selections[memory] = selection_positions(model.method)
    assert selections["streamed"].numel() == selections["dense"].numel() == model.method.capacity
    assert jaccard(selections["streamed"], selections["dense"]) >= 0.99


def test_streamed_quantile_is_large_quantile_of_the_concatenation():
    from dgss.tuning.fishertune.drfim import large_quantile
    from dgss.tuning.fishertune.streaming import streamed_quantile

    gen = torch.Generator().manual_seed(0)
    parts = [torch.rand(n, generator=gen).pow(8) * 10 ** (3 * i) for i, n in enumerate((7, 1000, 333))]
    parts.append(torch.tensor([0.25, 0.25, 0.25]))  # ties
    flat = torch.cat(parts)
    for q in (0.0, 0.1, 0.5, 0.9, 0.999, 1.0):
        assert streamed_quantile(lambda: iter(parts), q) == large_quantile(flat, q), q
    with pytest.raises(ValueError, match="empty"):
        streamed_quantile(lambda: iter([torch.zeros(0)]), 0.5)


def test_a_selection_file_loads_into_the_model_it_was_written_for_only(tmp_path):
    from dgss.tuning.fishertune.method import read_selection_file
    from dgss.tuning.fishertune.report import write_fisher_outputs

    model = fishertune_model("dinov2_s", "streamed")
    model.method.select(None, seed=3)  # random top-K
    written = write_fisher_outputs(model.method, tmp_path, plots=False)
    other = fishertune_model("dinov2_s", "streamed")
    loaded = read_selection_file(other.method, written["selection"])
    other.method.set_selection(loaded)
    assert torch.equal(selection_positions(other.method), selection_positions(model.method))
    smaller = fishertune_model("dinov2_s", "streamed", "method.fishertune.delta_max=0.02", "method.fishertune.delta_min=0.01")
    with pytest.raises(ValueError, match="not written for this model"):
        read_selection_file(smaller.method, written["selection"])
    with pytest.raises(ValueError, match="not found"):
        read_selection_file(other.method, tmp_path / "missing.safetensors")


DISTRIBUTED_ESTIMATE = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_fishertune_streaming import fishertune_model, synthetic_batches
from dgss.tuning.fishertune.report import selection_positions

dist.init_process_group("gloo")
rank, out = dist.get_rank(), {}
for memory in ("dense", "streamed"):
    model = fishertune_model("dinov2_s", memory)  # the same weights on both processes
    model.method.select(model.method.estimate(model, synthetic_batches(seed=1000 * rank), seed=0), seed=0)
    out[memory] = selection_positions(model.method)
if rank == 0:
    torch.save(out, sys.argv[1])
dist.destroy_process_group()
"""


def test_under_torch_distributed_the_streamed_estimate_selects_what_the_dense_one_selects(tmp_path):
    # streamed: each process keeps its own sums, reduced tensor by tensor where they are read
    from test_engine_support import run_python

    script, result = tmp_path / "estimate.py", tmp_path / "selections.pt"
    script.write_text(DISTRIBUTED_ESTIMATE)
    run = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
                     str(result), str(Path(__file__).parent))
    assert run.returncode == 0, run.stderr
    selections = torch.load(result, weights_only=True)
    assert selections["dense"].numel() == selections["streamed"].numel() > 0
    assert jaccard(selections["dense"], selections["streamed"]) >= 0.99
