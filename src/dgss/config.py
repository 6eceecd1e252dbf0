"""Typed experiment configuration: dataclasses, YAML loading, dotted overrides, validation.

An experiment is one YAML file whose keys mirror :class:`ExperimentConfig`. A file may start from
another with ``_base_: path`` (or a list of paths), resolved relative to the file; dictionaries merge
key by key and everything else is replaced. Command-line overrides use dotted keys
(``train.lr=2e-4 model.backbone=dinov2_l``) with YAML-parsed values.

Every key is checked against the schema: an unknown key names the closest valid one, a wrong type
names the key and the type it expects. No key is ever silently ignored.

The schema sections below are owned by the parts of the library that read them; each field's
comment says what it means and where the default comes from.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "ModelConfig",
    "HeadConfig",
    "MethodConfig",
    "ReinConfig",
    "FisherTuneConfig",
    "LoRAConfig",
    "VPTConfig",
    "AdaptFormerConfig",
    "VQTConfig",
    "ChildTuneConfig",
    "SoMAConfig",
    "FADAConfig",
    "EMAConfig",
    "DEFAULT_BACKBONE_LR_MULT",
    "DatasetConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "load_config",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "parse_overrides",
    "save_config",
    "validate_config",
    "check_name",
    "NON_EXPERIMENT_KEYS",
    "config_differences",
    "SHIPPED_CONFIGS",
    "resolve_config_path",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the key and what was expected."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class HeadConfig:
    """Decode head. Defaults are the Mask2Former head of Rein and FisherTune (protocols.md)."""

    type: str = "mask2former"  # "mask2former" | "fpn" (light per-pixel CE head) | "linear" (linear probe)
    num_classes: int = 19
    num_queries: int = 100
    hidden_dim: int = 256  # also the light head's width
    # feature levels the pixel decoder's encoder sees (strides 32/16/8) and the decoder layers cycle
    num_feature_levels: int = 3
    # pixel decoder (multi-scale deformable attention encoder)
    pixel_decoder_layers: int = 6
    pixel_decoder_ffn_dim: int = 1024
    num_heads: int = 8
    num_points: int = 4
    # transformer decoder
    decoder_layers: int = 9
    decoder_ffn_dim: int = 2048
    # criterion
    num_points_loss: int = 12544  # 112 x 112 points for matching and for the losses
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    # the per-pixel heads' classifier start (types "linear" and "fpn"): "normal" (the linear head: DINO's
    # linear probe, N(0, 0.01); the FPN head: PyTorch's default) or "zeros" (ViT's and BiT's fine-tuning
    # head: a random head drives the first backbone updates)
    classifier_init: Literal["normal", "zeros"] = "normal"


@dataclass
class ModelConfig:
    """Backbone (a timm VFM, see dgss.models.backbones) and head."""

    backbone: str = "dinov2_l"
    # None: random init; "hub": timm's pretrained download; otherwise a local file
    # (official DINOv2/EVA02/CLIP/SAM/MAE layouts, timm .safetensors/.pth).
    weights: Optional[str] = None
    img_size: int = 512
    patch_size: int = 16
    # How a pretrained patch kernel of another size is resized: "rein" = plain bicubic without
    # magnitude rescaling (what the published Rein checkpoints were trained on), "timm" = timm's
    # pseudo-inverse resampling.
    patch_resize: Literal["rein", "timm"] = "rein"
    out_indices: Optional[list[int]] = None  # None: the family's default (e.g. 7/11/15/23)
    drop_path_rate: float = 0.0
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # depth, embed_dim, ... (tiny models)
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class ReinConfig:
    """Rein (rein.md). Defaults are the published DINOv2-L configuration."""

    num_tokens: int = 100  # M, equals the number of Mask2Former queries
    lora_rank: Optional[int] = 16  # r; None selects the plain (non-LoRA) tokens
    query_dim: int = 256  # Q
    link: Literal["max_mean_last"] = "max_mean_last"
    scale_init: float = 1e-3
    # lr multiplier of the Reins' tensors (tokens, MLPs, scale). The official configs train them at the
    # head's lr (1.0); a world whose head lr is a linear probe's may want them slower (the testbed: 0.1)
    lr_mult: float = 1.0


@dataclass
class FADAConfig:
    """FADA (Bi et al., NeurIPS 2024): Rein's tokens on a Haar wavelet split of the features
    (dgss.tuning.fada). Defaults: the public code (github JingjunYi/FADA), config
    configs/_base_/models/rein_dinov2_mask2former.py (lines 16-24) and rein/models/backbones/reins.py."""

    num_tokens: int = 100  # M: token_length=100 (line 18), equals the number of Mask2Former queries
    lora_rank: Optional[int] = 16  # r: lora_dim=16 (line 23, LoRAReins); None: plain tokens (Reins)
    query_dim: int = 256  # Q: query_dims default (reins.py:19)
    scale_init: float = 1e-3  # reins.py:23
    lr_mult: float = 1.0  # as method.rein.lr_mult: the public config trains them at the head's lr
    # how the wavelet sees the tokens. "public_code": the (N, B, C) features reshaped (not transposed) to
    # B x C x h x w, as reins.py:149 does, which produced the published numbers; "paper": the spatial token
    # map, each band's 2 x 2 cell spread back over its four tokens (dgss.tuning.fada)
    layout: Literal["public_code", "paper"] = "public_code"
    # the four Haar filters train in the public code (its train() marks every "reins" parameter
    # trainable); false: the fixed Haar kernels of the paper
    train_wavelet: bool = True


@dataclass
class FisherTuneConfig:
    """FisherTune (fishertune.md). Defaults are the ones that document lists; dgss.tuning.fishertune
    documents each choice where it is made."""

    # estimation (stage 2): num_batches source batches, each seen as x and as x'
    num_batches: int = 100
    per_sample: bool = True  # per-image squared gradients (B passes per batch); false: batch-mean gradient x B
    # simulated shift x': feature statistics perturbed at the input of these blocks
    eps_mu: float = 0.5
    eps_sigma: float = 0.5
    perturb_layers: list[int] = field(default_factory=lambda: [0])
    # DR-FIM = task / its top-delta_max threshold + domain_balance * e^-(eps_mu+eps_sigma) * domain / its
    # threshold. The defaults below are measured choices (docs/performance.md, "FisherTune's ranking"):
    # balance 2 is the smallest at which the variational estimate is consistently stabler than the plain
    # one, with both terms shaping the set; "tensor" keeps patch_embed from taking 93-98% of the budget.
    domain_balance: float = 2.0
    normalization: Literal["global", "tensor"] = "tensor"  # tensor: per-tensor Fisher units and data scale
    # variational estimate (dgss.tuning.fishertune.drfim): prior tau = prior_rho x RMS of each pretrained
    # tensor; data and prior precision equal at the prior_quantile of tau^2 F; Lambda updated every batch
    variational: bool = True
    prior_rho: float = 0.05
    prior_quantile: float = 0.9
    ratio_eps: float = 1e-8  # plain form: the ratio's eps, relative to the mean Fisher
    # selection and schedule: delta(t) = delta_max - (delta_max - delta_min) exp(-t / T_s)
    delta_min: float = 0.01
    delta_max: float = 0.05
    schedule_tau_frac: float = 0.2  # T_s = T3 / 5
    warmup_iters: int = 1000  # T1
    # The paper's ablations (Table 4, Fig. 5, Table 5), one option each: drfim | fisher (the task term
    # alone, F(x); no x' is estimated) | domain (the domain term alone, "Delta F") | random;
    # variational=false: the plain estimate at theta_pt; train_perturb_prob=0: no x' in training
    selection: Literal["drfim", "fisher", "domain", "random"] = "drfim"
    eligible: Optional[list[str]] = None  # fnmatch patterns on backbone parameter names; None: all
    delta_weight_decay: Optional[float] = None  # None: train.weight_decay (it pulls delta towards 0)
    refresh_interval: int = 0  # re-rank the not-yet-active candidates every N stage-3 iterations; 0: never
    # Train on x' in this fraction of stage-3 iterations (a feature-statistics augmentation). The paper's
    # Table 5 applies its perturbation to the baselines "for a fair comparison", so FisherTune's own
    # numbers train with it; the rate is not given: 0.5, the rate of DSU (Li et al., ICLR 2022), the
    # feature-statistics augmentation x' resembles.
    train_perturb_prob: float = 0.5
    # Memory of the estimate: "streamed" squares each tensor's gradient into its sum as soon as it exists
    # and ranks one tensor's scores at a time with a running top-k (what fits DINOv3-7B on one 141 GB GPU);
    # "dense" keeps every gradient and score at once (the reference; it also skips a pass with a
    # non-finite gradient under a finite loss, where "streamed" stops). Both select the same entries.
    estimate_memory: Literal["streamed", "dense"] = "streamed"
    # Precision of the estimate's passes: "fp32" (with train.tf32's TF32 matmuls on a GPU), or "amp": the
    # run's train.amp when it is bf16 (fp16 is never used: its squared gradients underflow). fp32 by
    # default: on a tiny CPU model bf16 passes select 0.92-0.98 of fp32's entries (Jaccard), below the
    # 0.99 the streamed estimate is held to (docs/speed.md); benchmarks/gpu_check.py's speed section
    # measures the agreement and the time saved at DINOv2-L scale.
    estimate_precision: Literal["fp32", "amp"] = "fp32"
    # A selection.safetensors that `dgss fisher` wrote for this config: stage 2 loads it instead of
    # estimating. Under train.parallel=fsdp it is required (the estimate needs the unsharded model: run
    # `dgss fisher` on one GPU large enough for it, `dgss plan` tells which, then train sharded)
    selection_file: Optional[str] = None


@dataclass
class LoRAConfig:
    """LoRA (Hu et al., ICLR 2022) through Hugging Face ``peft`` (dgss.tuning.lora)."""

    # r = 8 on the fused qkv projection of every block: 786,432 parameters on DINOv2-L, the 0.79M of the
    # LoRA row in Rein's Table 1 (and FisherTune's); alpha = r (the LoRA paper sets alpha to the first r it
    # tries and does not tune it), i.e. a scaling of 1; no dropout.
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    # projections of every block: qkv (fused, or EVA's q/k/v_proj), proj, fc1 (SwiGLU: fc1_g and fc1_x), fc2
    targets: list[str] = field(default_factory=lambda: ["qkv"])


@dataclass
class VPTConfig:
    """VPT-deep (Jia et al., ECCV 2022): prompt tokens prepended before every layer, dropped after it."""

    num_tokens: int = 150  # per layer, as the Rein authors used (3.69M on DINOv2-L)
    # prompts are drawn from U(-v, v), v = sqrt(6 / (3 * patch^2 + C)) (VPT's Xavier-uniform init with
    # the patch embedding's fan-in); 0 gives zero prompts
    init: Literal["xavier", "zeros"] = "xavier"
    dropout: float = 0.0  # on the prompts (VPT's prompt dropout; 0.0 in the Rein baseline)


@dataclass
class AdaptFormerConfig:
    """AdaptFormer (Chen et al., NeurIPS 2022): a parallel bottleneck adapter on every MLP."""

    bottleneck: int = 64  # AdaptFormer's default (3.17M on DINOv2-L)
    scale: float = 0.1  # s, fixed (AdaptFormer's default for ViTs)
    dropout: float = 0.0


@dataclass
class VQTConfig:
    """Visual Query Tuning (Tu et al., CVPR 2023): per-layer query tokens read each frozen layer."""

    num_tokens: int = 10  # T query tokens per layer (see dgss.tuning.vqt for the choice)


@dataclass
class ChildTuneConfig:
    """Child-Tuning (Xu et al., EMNLP 2021): gradients of a child network only (dgss.tuning.childtune)."""

    # ChildTuning-F: each step every backbone gradient entry is kept with probability p_f and rescaled by
    # 1 / p_f (the paper searches p_F in {0.2, 0.3, 0.4}; 0.3 is the middle)
    p_f: float = 0.3
    # ChildTuning-D: the top p_d of the backbone's entries by Fisher information are the child network
    # (the paper searches p_D in {0.1, 0.2, 0.3}; 0.2 is the middle)
    p_d: float = 0.2
    # ChildTuning-D's Fisher: source batches at the pretrained weights (the paper uses one pass over the
    # training set; 100 batches is FisherTune's budget, so both rank from the same data)
    num_batches: int = 100
    warmup_iters: int = 0  # head-only iterations before the Fisher (the paper has none)
    eligible: Optional[list[str]] = None  # fnmatch patterns on backbone parameter names; None: all


@dataclass
class SoMAConfig:
    """SoMA (Yun et al., CVPR 2025): the minor singular components of the targeted weights train, the
    residual stays frozen (dgss.tuning.soma). Defaults: the public code (github ysj9909/SoMA), DGSS
    config configs/sora/sora_dinov2-L_mask2former.py and rein/peft/sora.py."""

    rank: int = 16  # r: "rank = 16" in that config
    alpha: float = 16.0  # lora_alpha = rank there: scaling alpha / r = 1
    # target_modules ['q', 'k', 'v', 'proj', 'fc1', 'fc2']: every Linear of the tuned blocks (a fused qkv
    # is split into q, k, v; EVA's q/k/v_proj and SwiGLU's fc1_g/fc1_x are separate already)
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    # start_lora_idx = 8: blocks 0-7 (the domain-generalizable early blocks) stay frozen. The public code
    # has no EVA02-L config; dgss uses 8 for it too (both are 24-block ViT-Ls)
    start_block: int = 8
    train_bias: bool = True  # SoraConfig's default bias="all": the tuned layers' biases train too
    # "minor": the r smallest singular triplets (SoMA); "principal": the r largest (the code's first_eigen)
    components: Literal["minor", "principal"] = "minor"
    # weight decay of every optimizer group annealed by a cosine from train.weight_decay to wd_min over
    # train.iters (CosineAnnealingParamScheduler, param_name weight_decay, eta_min 1e-5, end 40000 in that
    # config); null: constant weight decay
    wd_min: Optional[float] = 1.0e-5
    # the exact SVD (lora_weight_init "sora") in float64 on the weight's device (the code uses float32;
    # float64 resolves the smallest singular vectors better)
    svd_dtype: Literal["float64", "float32"] = "float64"
    # which weights the factors start from. "paper": the pretrained weights' minor components, the residual
    # W - s B A frozen, so training starts exactly at the pretrained model. "public_code": what the public
    # code ran (it decomposes the backbone's randomly initialised weights, before the pretrained ones are
    # loaded over the residual): the minor components of a seeded PyTorch-default nn.Linear initialisation,
    # the residual the plain pretrained W, so training starts at W + s B A (dgss.tuning.soma)
    init: Literal["paper", "public_code"] = "paper"
    init_seed: int = 0  # "public_code": seed of the random weights that are decomposed


@dataclass
class LPFTConfig:
    """LP-FT (Kumar et al., ICLR'22, "Fine-Tuning can Distort Pretrained Features"): the head trains
    alone on the frozen backbone first (linear probing's role), then everything trains (dgss.tuning.lpft)."""

    # share of train.iters in the probing stage; the paper probes to convergence first, dgss splits one
    # budget, half and half by default
    probe_fraction: float = 0.5


# name -> the backbone lr multiplier a method gets when method.backbone_lr_mult is not set. Full
# fine-tuning collapses at lr x 1 (the Rein authors' finding, protocols.md); ChildTune-F is full
# fine-tuning with a random gradient mask, so it gets the same.
# SoMA's factors stand for backbone weights and get the public code's "backbone" lr_mult 0.5.
DEFAULT_BACKBONE_LR_MULT = {"full": 0.1, "lp-ft": 0.1, "childtune-f": 0.1, "soma": 0.5}


@dataclass
class MethodConfig:
    """Which tuning method adapts the backbone, and its options."""

    # frozen | full | lp-ft | rein | fishertune | lora | vpt | adaptformer | vqt | childtune-f | childtune-d | soma | fada
    name: str = "frozen"
    # lr multiplier of the pretrained backbone's trainable tensors and of the tensors that stand for
    # their updates (LoRA's and SoMA's factors, FisherTune's delta); null: the method's default
    # (DEFAULT_BACKBONE_LR_MULT: 0.1 for full and childtune-f, 0.5 for soma, else 1.0), resolved when the
    # config is built
    backbone_lr_mult: Optional[float] = None
    rein: ReinConfig = field(default_factory=ReinConfig)
    fada: FADAConfig = field(default_factory=FADAConfig)
    fishertune: FisherTuneConfig = field(default_factory=FisherTuneConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    vpt: VPTConfig = field(default_factory=VPTConfig)
    adaptformer: AdaptFormerConfig = field(default_factory=AdaptFormerConfig)
    vqt: VQTConfig = field(default_factory=VQTConfig)
    childtune: ChildTuneConfig = field(default_factory=ChildTuneConfig)
    soma: SoMAConfig = field(default_factory=SoMAConfig)
    lpft: LPFTConfig = field(default_factory=LPFTConfig)
    options: dict[str, Any] = field(default_factory=dict)  # options of methods added outside dgss

    def __post_init__(self) -> None:
        if self.backbone_lr_mult is None:
            self.backbone_lr_mult = DEFAULT_BACKBONE_LR_MULT.get(self.name, 1.0)


@dataclass
class DatasetConfig:
    """One dataset in the layout its official download unpacks to (protocols.md)."""

    type: str = "cityscapes"  # gtav | synthia | cityscapes | bdd100k | mapillary | acdc | urbansyn | folder | synthetic
    root: str = ""
    split: str = "val"  # not used by layouts without split folders (gtav, synthia, urbansyn, folder)
    name: Optional[str] = None  # display name in tables; default: type (+ condition, corruption)
    condition: Optional[str] = None  # ACDC: fog | night | rain | snow (None: all four)
    # restrict to the images listed, one per line: file stem, or path relative to the root
    # (with or without extension); relative list paths are resolved against the root
    list_file: Optional[str] = None
    first_n: Optional[int] = None  # restrict to the first N images (sorted, or in list_file order)
    # deterministic random fraction (e.g. 0.0625 = 1/16 of Cityscapes), after list_file/first_n;
    # training writes the chosen list next to the run and reuses it when it exists
    fraction: Optional[float] = None
    fraction_seed: int = 0  # seed of that draw
    resize: Optional[list[int]] = None  # evaluation resize-to-fit (W, H), e.g. [1024, 512]
    with_labels: bool = True  # false: images only (e.g. ACDC test for prediction), samples have no label
    # an unreadable/truncated file or an image/label size mismatch: stop, or skip it with a warning
    on_bad_sample: Literal["error", "skip"] = "error"
    # label values outside the dataset's mapping: stop, or map them to 255 with a warning
    on_unknown_label: Literal["error", "ignore"] = "error"
    # Cityscapes-C style corruption applied at evaluation (dgss.data.corruptions.CORRUPTIONS, needs the
    # optional imagecorruptions package) and its severity 1..5 (required with a corruption)
    corruption: Optional[str] = None
    severity: Optional[int] = None
    options: dict[str, Any] = field(default_factory=dict)  # layout-specific options (dgss.data docs)


@dataclass
class DataConfig:
    train: list[DatasetConfig] = field(default_factory=list)
    val: list[DatasetConfig] = field(default_factory=list)  # source-domain model selection
    test: list[DatasetConfig] = field(default_factory=list)  # target domains
    # multi-source training: draw sources in proportion to their sizes, or each equally often
    sampling: Literal["proportional", "uniform"] = "proportional"
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # (h, w)
    # random short side: int(512 * x / 10) for x = 5..20, i.e. 256, 307, ..., 1024 (the reference list)
    scales: list[int] = field(default_factory=lambda: [int(512 * x * 0.1) for x in range(5, 21)])
    max_long_side: int = 2048
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric_distortion: bool = True  # brightness +-32, contrast/saturation 0.5-1.5, hue +-18
    num_workers: int = 4  # DataLoader workers per process (training and evaluation)
    mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])


@dataclass
class EMAConfig:
    """Exponential moving average of the trainable weights (dgss.engine.ema), as mmengine's EMAHook keeps
    it: used for validation and written as the final model; the raw weights are kept beside it."""

    enabled: bool = False
    # after every iteration: ema = (1 - momentum) * ema + momentum * weights. mmengine's convention (the
    # weight of the new value, not the decay of the old average); 2e-4 is mmengine's default
    momentum: float = 2.0e-4
    # the average starts after iteration max(begin_iter, 1) (counted from 1): until then it is a copy of
    # the weights (mmengine's EMAHook begin_iter; the SoMA public code uses 12000)
    begin_iter: int = 0


@dataclass
class HeadOptimConfig:
    """How the head's parameters are optimised (dgss.engine.optim). The default is the papers' recipe: the
    head in the one AdamW, at train.lr and train.weight_decay."""

    # "sgd": SGD with momentum for the head (torch.optim.SGD's update, coupled L2 decay), the other groups
    # in AdamW. Linear probes are trained so (DINO's eval_linear: momentum 0.9, no decay): from a small
    # initialisation, SGD leaves the directions the source does not constrain where they started, where
    # AdamW's normalised steps random-walk them, so a seed chooses what the probe does out of domain
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr_mult: float = 1.0  # the head's lr = train.lr x lr_mult (the poly schedule applies as to every group)
    momentum: float = 0.9  # sgd only
    # the decay of the head's decayed parameters (its norms never decay: NO_DECAY_KEYWORDS); None:
    # train.weight_decay
    weight_decay: Optional[float] = None


@dataclass
class TrainConfig:
    """Iteration-based training (dgss.engine); defaults are the 512 recipe of protocols.md."""

    iters: int = 40000
    # images per process and micro-batch; the effective batch is batch_size x processes x grad_accum
    # (the 1024 recipe's "batch 8 (2 x 4 GPUs)" is batch_size 2 on 4 processes)
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # lr(it) = lr * (1 - t)^poly_power, t going from 0 after the warm-up to 1 at `iters`, floored at
    # min_lr (protocols.md names no floor, so the default decays to 0)
    poly_power: float = 0.9
    # "poly" (the papers', above) or "cosine": lr * (1 + cos(pi t)) / 2, the same t and floor (SGDR
    # without restarts; DINO's linear probes). Cosine spends about 2.7 x as many iterations below a tenth
    # of the lr, so the last weights average more batches (dgss.engine.schedule)
    lr_decay: Literal["poly", "cosine"] = "poly"
    min_lr: float = 0.0
    warmup_iters: int = 0  # linear warm-up from lr * warmup_start_factor to lr (1024 recipe: 10000)
    warmup_start_factor: float = 1e-6
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_grad: Optional[float] = None  # max global gradient L2 norm; None: no clipping
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast on GPU (fp16 with a GradScaler); fp32 on CPU
    # TF32 tensor-core matmuls and convolutions for fp32 work on an Ampere-or-newer GPU (training,
    # evaluation, predict, FisherTune's estimate): 10-bit mantissa products with fp32 accumulation, what
    # timm's train script and Lightning recommend. false: full fp32 matmuls, torch's defaults (dgss's
    # numerics before this option, bit for bit). No effect on a CPU or on bf16/fp16 products.
    tf32: bool = True
    # AdamW's implementation: fused (one kernel for all tensors) on CUDA, foreach elsewhere (the same
    # updates within float rounding; foreach is bit-identical to torch's per-tensor loop on a CPU).
    # false: torch's default choice (foreach on CUDA), dgss's behaviour before this option
    fused_adamw: bool = True
    seed: int = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: the process's GPU (LOCAL_RANK) when there is one
    eval_interval: int = 4000  # source-domain validation (data.val) every N iterations; 0: never
    checkpoint_interval: int = 4000  # 0: only the final model
    keep_checkpoints: int = 2  # most recent training checkpoints kept on disk; 0: all
    log_interval: int = 50  # iterations between log lines / TensorBoard points
    progress_bar: bool = True  # tqdm bar on rank 0 (loss, lr, it/s, ETA)
    # what a non-finite loss does: stop (nothing is saved, the last checkpoint stays as it is) or
    # skip the optimizer step with a warning
    nan_policy: Literal["stop", "skip"] = "stop"
    # nan_policy skip: the most optimizer steps skipped in a row; one more stops the run. The weights do
    # not change while steps are skipped, so a run whose loss is non-finite on this many different
    # batches in a row is broken, not unlucky (no paper sets this: 5 is dgss's choice)
    max_consecutive_skips: int = 5
    # DDP: allow trainable parameters that get no gradient (a ViT's final norm under full fine-tuning,
    # a method's queries with a head that takes none); false saves a graph traversal per step when
    # every trainable parameter always gets a gradient
    find_unused_parameters: bool = True
    # activation checkpointing of every backbone block (timm's, non-reentrant): only block inputs are
    # stored and each block is run again in the backward pass, i.e. about one extra backbone forward
    # per step for far less backbone activation memory (the head's is unchanged); same losses and
    # gradients. The speed options may change when resuming.
    grad_checkpointing: bool = False
    # what checkpointing recomputes of a method's hooks on a block (Rein, VPT): "replay" (timm's: the hooks
    # run again with the block, the least memory) or "keep" (only the block's own forward is recomputed;
    # its hooks run once and keep their activations). "replay" stays the default until
    # benchmarks/gpu_check.py's speed section measures "keep" on a GPU (issue 38: the H200 found
    # Rein's bf16 step 1.53 x slower checkpointed, Full's 1.17 x). Hooks inside a block (LoRA, FisherTune,
    # SoMA) are recomputed either way; same losses and gradients either way.
    checkpoint_hooks: Literal["replay", "keep"] = "replay"
    # torch.compile of the backbone and the head, in place (state-dict keys and checkpoints unchanged)
    # and before DDP wraps the model; the first steps (and each new input shape) pay the compilation
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager"/"eager" to debug a failure
    # several processes: "ddp" replicates the model (DistributedDataParallel), "fsdp" shards parameters,
    # gradients and optimizer state over the processes (torch's FSDP2, fully_shard per backbone block;
    # checkpoints through torch.distributed.checkpoint, see dgss.engine.fsdp), for models whose weights
    # and state one GPU cannot hold (`dgss plan` tells). One process: the same either way.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    ema: EMAConfig = field(default_factory=EMAConfig)  # weight EMA (off by default)
    head_optim: HeadOptimConfig = field(default_factory=HeadOptimConfig)  # the head's optimizer rule


@dataclass
class EvalConfig:
    """Inference for validation and `dgss eval` (protocols.md "Evaluation")."""

    # slide: overlapping windows; whole: one pass; coarse_to_fine: a whole pass at coarse_scale and the
    # sliding window at scale, their scores fused (dgss.models.inference, docs/inference.md)
    mode: Literal["slide", "whole", "coarse_to_fine"] = "slide"
    # the image (as the loader gives it: 1024 x 512 for Cityscapes) is resized by this factor before
    # inference and the scores back to the label's size; 2.0 runs Rein's 1024 x 512 protocol at
    # 2048 x 1024. 1.0: no resize at all (bit for bit the unscaled path)
    scale: float = 1.0
    coarse_scale: float = 0.5  # coarse_to_fine: the whole pass's resize factor (a choice: no paper fixes it)
    coarse_weight: float = 0.5  # coarse_to_fine: fused = w * coarse + (1 - w) * fine (0.5: mmseg's TTA mean)
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # (h, w); 1024 recipe: 1024
    stride: list[int] = field(default_factory=lambda: [341, 341])  # (h, w); 1024 recipe: 683
    batch_windows: int = 8  # sliding windows per forward pass
    # > 0: before a model file is evaluated (`dgss eval`, the demo's runs and the DG testbed), every
    # BatchNorm's running statistics are estimated again as the plain average over this many training
    # batches of the config (PreciseBN, dgss.engine.precise_bn); 0: the statistics training kept.
    # Validation during training (train.eval_interval) does not apply it
    precise_bn_batches: int = 0


@dataclass
class GeCoLossConfig:
    """GeCo's geometric-consistency loss (Zang et al., CVPR 2026; dgss.models.geco, docs/methods/geco.md).
    Defaults: the public code's GTAV config (github DZhaoXd/GeCo at 5c5f12a,
    configs/geco/geco_dinov2-L_mask2former_gta.py lines 8-23)."""

    enabled: bool = False
    weight: float = 0.1  # lambda_geo
    start_iter: int = 1000  # warmup_iters: no loss (and no perturbation drawn) before this iteration
    alpha: float = 0.1  # the largest step, alpha / (1 + curvature), times the token's RMS
    beta: float = 0.2  # weight of the normal component in low-curvature tokens' direction
    num_neighbors: int = 8  # k nearest tokens (cosine geometry) that span the local tangent plane
    tangent_dim: int = 4  # d leading principal directions of the neighbours' offsets
    curvature_threshold: Optional[float] = None  # None: the per-image curvature_quantile
    curvature_quantile: float = 0.5
    max_tokens: int = 1024  # larger maps are average-pooled to at most this many tokens first
    eps: float = 1.0e-6
    detach_clean: bool = True  # the clean prediction is a target (no gradient)
    levels: list[int] = field(default_factory=lambda: [-1])  # which of the 4 maps are perturbed (-1: stride 32)


@dataclass
class LossConfig:
    """Loss terms added to the head's, for any method (the segmentor never asks which method it holds)."""

    geco: GeCoLossConfig = field(default_factory=GeCoLossConfig)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    output_dir: str = "runs"  # the run writes to output_dir/name
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------------------------
# Typed conversion
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert a YAML value to ``tp`` or raise a ConfigError naming ``key``."""
    where = f" in {source}" if source else ""

    def fail() -> ConfigError:
        return ConfigError(f"key '{key}'{where} expects {_type_name(tp)}, got {_describe(value)}")

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise fail()
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise fail()
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"key '{key}'{where} expects {_type_name(tp)}, got {value!r}{hint}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return from_dict(tp, value, prefix=key, source=source)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise fail()
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail()
        args = typing.get_args(tp)
        val_tp = args[1] if args else Any
        return {str(k): _convert(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    raise fail()


def from_dict(cls: type, data: dict, *, prefix: str = "", source: str = "") -> Any:
    """Build dataclass ``cls`` from a plain dict, validating every key and type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            where = f" in {source}" if source else ""
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            valid = ", ".join(names)
            raise ConfigError(f"unknown key '{full}'{where}{hint} (valid keys: {valid})")
        kwargs[key] = _convert(value, hints[key], full, source)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A plain, YAML-serialisable dict of a config dataclass."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# Values: names that must exist, sizes that must be positive
# --------------------------------------------------------------------------------------------


def check_name(key: str, value: str, valid, what: str, where: str = "") -> None:
    """Raise a one-line ConfigError when ``value`` (at ``key``) is not one of ``valid``, naming the closest
    valid name; ``where``: " in FILE" or "". The registries' modules and the config check call it."""
    if value in valid:
        return
    close = difflib.get_close_matches(str(value), list(valid), n=1, cutoff=0.3)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"key '{key}'{where}: unknown {what} '{value}'{hint} (valid: {', '.join(sorted(valid))})")


def _check_at_least(key: str, value: Optional[float], low: float, where: str) -> None:
    if value is not None and value < low:
        raise ConfigError(f"key '{key}'{where} must be at least {low:g}, got {value:g}")


def validate_config(cfg: ExperimentConfig, source: str = "") -> ExperimentConfig:
    """Check what the schema's types cannot: sizes, counts, rates and intervals are in range. The names a
    config gives to the registries (backbone, head, method, dataset types) are checked above this module,
    where the registries are importable: :func:`dgss.engine.config_check.check_config` runs both, and is
    the one check behind ``dgss config`` and the train, eval and fisher paths.

    Raises:
        ConfigError: one line naming the key and the value.
    """
    where = f" in {source}" if source else ""
    for split in ("train", "val", "test"):
        for i, ds in enumerate(getattr(cfg.data, split)):
            key = f"data.{split}[{i}]"
            _check_at_least(f"{key}.first_n", ds.first_n, 1, where)
            if ds.fraction is not None and not 0 < ds.fraction <= 1:
                raise ConfigError(f"key '{key}.fraction'{where} must be in (0, 1], got {ds.fraction:g}")
            if ds.severity is not None and not 1 <= ds.severity <= 5:
                raise ConfigError(f"key '{key}.severity'{where} must be 1..5, got {ds.severity}")
    train = cfg.train
    for key, value in (("train.iters", train.iters), ("train.batch_size", train.batch_size),
                       ("train.grad_accum", train.grad_accum), ("eval.batch_windows", cfg.eval.batch_windows),
                       ("model.img_size", cfg.model.img_size), ("model.patch_size", cfg.model.patch_size),
                       ("model.head.num_classes", cfg.model.head.num_classes)):
        _check_at_least(key, value, 1, where)
    for key, value in (("train.warmup_iters", train.warmup_iters), ("train.eval_interval", train.eval_interval),
                       ("train.checkpoint_interval", train.checkpoint_interval),
                       ("train.keep_checkpoints", train.keep_checkpoints), ("train.log_interval", train.log_interval),
                       ("train.lr", train.lr), ("train.min_lr", train.min_lr),
                       ("data.num_workers", cfg.data.num_workers),
                       ("eval.precise_bn_batches", cfg.eval.precise_bn_batches),
                       ("train.max_consecutive_skips", train.max_consecutive_skips)):
        _check_at_least(key, value, 0, where)
    _check_at_least("train.ema.begin_iter", train.ema.begin_iter, 0, where)
    if not 0 < train.ema.momentum <= 1:
        raise ConfigError(f"key 'train.ema.momentum'{where} must be in (0, 1] (the weight of the new weights, "
                          f"mmengine's convention), got {train.ema.momentum:g}")
    if train.warmup_iters >= train.iters:
        raise ConfigError(f"key 'train.warmup_iters'{where} must be below train.iters ({train.iters}), got "
                          f"{train.warmup_iters}; at most {train.iters - 1}")
    for key, size in (("data.crop_size", cfg.data.crop_size), ("eval.crop_size", cfg.eval.crop_size),
                      ("eval.stride", cfg.eval.stride)):
        if len(size) != 2 or min(size) < 1:
            raise ConfigError(f"key '{key}'{where} must be two sizes >= 1 (h, w), got {size}")
    _validate_inference_and_loss(cfg, where)
    return cfg


def _validate_inference_and_loss(cfg: ExperimentConfig, where: str) -> None:
    for key, value in (("eval.scale", cfg.eval.scale), ("eval.coarse_scale", cfg.eval.coarse_scale)):
        if not value > 0:
            raise ConfigError(f"key '{key}'{where} must be above 0 (a resize factor), got {value:g}")
    if not 0 <= cfg.eval.coarse_weight <= 1:
        raise ConfigError(f"key 'eval.coarse_weight'{where} must be in [0, 1], got {cfg.eval.coarse_weight:g}")
    geco = cfg.loss.geco
    for key, value, low in (("weight", geco.weight, 0), ("start_iter", geco.start_iter, 0), ("alpha", geco.alpha, 0),
                            ("beta", geco.beta, 0), ("num_neighbors", geco.num_neighbors, 1),
                            ("tangent_dim", geco.tangent_dim, 1), ("max_tokens", geco.max_tokens, 2),
                            ("eps", geco.eps, 0)):
        _check_at_least(f"loss.geco.{key}", value, low, where)
    if not 0 <= geco.curvature_quantile <= 1:
        raise ConfigError(f"key 'loss.geco.curvature_quantile'{where} must be in [0, 1], got {geco.curvature_quantile:g}")
    if not geco.levels or any(not -4 <= level <= 3 for level in geco.levels):
        raise ConfigError(f"key 'loss.geco.levels'{where} must list levels of the 4 feature maps (0..3 or -4..-1), "
                          f"got {geco.levels}")


# --------------------------------------------------------------------------------------------
# Files and overrides
# --------------------------------------------------------------------------------------------


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in chain:
        raise ConfigError(f"config {path} includes itself through _base_")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
        merged = _deep_merge(merged, _read_yaml(base_path, chain + (path.resolve(),)))
    return _deep_merge(merged, data)


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["train.lr=2e-4", "model.backbone=dinov2_l"]`` -> [(key, value)], values parsed as YAML."""
    parsed = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Set dotted keys in a raw config dict (list items by index: ``data.test.0.root=...``)."""
    data = _deep_copy(data)
    for key, value in overrides:
        node: Any = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, part, key)]
                continue
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override '{key}': '{'.'.join(parts[: depth + 1])}' is not a section")
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, key)] = value
        else:
            node[last] = value
    return data


def _list_index(node: list, part: str, key: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override '{key}': '{part}' is not a valid index of a list of {len(node)}")
    return int(part)


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj


# The configs that ship inside the package (configs/ at the repository root is a link to this folder).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | os.PathLike) -> Path:
    """The file ``path`` names: the path itself when it exists (a local file always wins), else the shipped
    config of that name (``rein/dinov2-l_gtav_512.yaml``, also spelt ``configs/rein/...``), so the
    documented commands work after a plain ``pip install``.

    Raises:
        ConfigError: neither exists; the message names both places.
    """
    local = Path(path)
    if local.is_file():
        return local
    relative = Path(*local.parts[1:]) if local.parts[:1] == ("configs",) else local
    shipped = SHIPPED_CONFIGS / relative
    if not local.is_absolute() and shipped.is_file():
        return shipped
    raise ConfigError(f"config file not found: {path} (neither here, {local.absolute()}, nor among the shipped "
                      f"configs, {shipped}; `dgss configs list` names those)")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment YAML (with ``_base_`` files) and apply dotted overrides.

    Without a path, the defaults of :class:`ExperimentConfig` are the starting point. A path that is not
    on disk may name a shipped config (:func:`resolve_config_path`).
    """
    data = _read_yaml(resolve_config_path(path)) if path is not None else {}
    source = str(path) if path is not None else ""
    if overrides:
        try:
            data = apply_overrides(data, parse_overrides(overrides))
        except ConfigError:
            raise
        source = f"{source} (with command-line overrides)" if source else "command-line overrides"
    return from_dict(ExperimentConfig, data, source=source)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the fully resolved config as YAML, atomically (temp file + rename, the umask's mode)."""
    from .fileio import atomic_write

    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# Keys (and whole sections, by prefix) that do not change what an experiment produces, its model and
# its test scores: where it writes, what it shows, what it keeps, how fast it runs. `dgss compare`
# ignores them when it checks a finished run against the requested config; a resume does not warn
# about them. Everything else (model, method, data.train/test, eval, train.lr/iters/seed/amp/...) counts.
NON_EXPERIMENT_KEYS = (
    "name", "output_dir",  # where the run is
    "train.progress_bar", "train.log_interval",  # what it shows
    "train.eval_interval", "data.val",  # source validation: reported, never selects the model
    "train.checkpoint_interval", "train.keep_checkpoints",  # what it keeps on disk
    "train.device", "data.num_workers", "train.find_unused_parameters",  # where and how fast it runs
    "train.grad_checkpointing", "train.checkpoint_hooks", "train.compile", "train.compile_mode",  # same losses
    "train.compile_backend",
    "train.parallel",  # FSDP's step equals DDP's
    "train.fused_adamw",  # the same updates within float rounding
)


def config_differences(old: dict, new: dict, *, ignore: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (lists of equal length compared item by
    item, e.g. ``data.test.1.root``), leaving out ``ignore`` keys and everything under them."""
    keys = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if any(name == k or name.startswith(k + ".") for k in ignore):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, ignore=ignore, prefix=name + ".")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a != b:
            keys += config_differences(dict(enumerate(a)), dict(enumerate(b)), ignore=ignore, prefix=name + ".")
        elif a != b:
            keys.append(name)
    return keys
