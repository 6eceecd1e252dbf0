"""Label-free pretraining of the testbed's foundation ViT: DINO self-distillation + iBOT masked patches.

    objective = SelfDistillation(backbone, SSLRecipe())           # student = backbone, teacher = its EMA
    views = multi_crop(images, recipe, generator)                  # 2 global + L local views, no labels
    loss, logs = objective(views, masks)                           # DINO on the class token, iBOT on masked patches
    objective.update_teacher(momentum)                             # after the optimizer step

The objective follows DINO (Caron et al., ICCV'21) for the class token and iBOT (Zhou et al., ICLR'22)
for the patch tokens, as DINOv2 combines them: a student sees two global crops (with a random subset
of their patches replaced by a learned mask token) and several small local crops; a teacher, the
exponential moving average of the student, sees the two global crops unmasked. The student matches
the teacher's centred, sharpened prototype distribution of the *other* global crop (and, from each
local crop, of both), and at every masked patch the teacher's distribution of that patch. KoLeo
(DINOv2) spreads the class tokens of a batch and is off by default (``koleo_weight`` 0; measured in
docs/figures/testbed_log.md).

Collapse is what kills self-distillation at small batch (dgss's 32 against DINOv2's 2048), so the
defaults follow what the literature reports to help there: few prototypes (512), teacher temperature
0.04, centering (momentum 0.9), the head's last layer frozen for the first iterations, and the
monitors of :func:`collapse_monitors` (the teacher's entropy per sample and of its batch-mean
distribution, and the effective rank of the patch features) logged throughout.

No augmentation darkens an image below :data:`dgss.testbed.pool.MIN_EXPOSURE`: the brightness jitter's
lower bound is ``brightness[0]`` (0.75) and solarisation, which DINO uses and which turns bright
surfaces dark, is left out, so the held-out night family cannot appear in any view.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SSLRecipe", "ProjectionHead", "SelfDistillation", "multi_crop", "random_patch_masks",
           "collapse_monitors", "effective_rank", "encode_tokens"]


@dataclass(frozen=True)
class SSLRecipe:
    """Every choice of the objective and its augmentations (the shipped file's manifest repeats them)."""

    objective: str = "dino_ibot"  # "dino" (class token only) | "dino_ibot" (+ masked patches)
    prototypes: int = 512  # K: few prototypes resist collapse at small batch
    head_hidden: int = 256
    head_bottleneck: int = 96
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # <= 0.04: a sharper teacher resists collapse
    center_momentum: float = 0.9
    ibot_weight: float = 1.0
    koleo_weight: float = 0.0
    mask_prob: float = 0.5  # share of global views that are masked
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # masked share of a masked view's patches
    freeze_last_layer_iters: int = 100
    global_size: int = 96
    local_size: int = 48
    local_crops: int = 4
    global_scale: tuple[float, float] = (0.35, 1.0)
    local_scale: tuple[float, float] = (0.08, 0.35)
    brightness: tuple[float, float] = (0.75, 1.3)  # never darker than 0.75 x a pool image (night stays out)
    contrast: tuple[float, float] = (0.6, 1.4)
    saturation: tuple[float, float] = (0.4, 1.6)
    hue: float = 0.1
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, locals (DINO's)
    extra: dict = field(default_factory=dict)


class ProjectionHead(nn.Module):
    """DINO's head: MLP (GELU) to a bottleneck, L2-normalised, then weight-normalised prototypes.
    ... x C -> ... x K logits."""

    def __init__(self, dim: int, recipe: SSLRecipe):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, recipe.head_hidden), nn.GELU(),
                                 nn.Linear(recipe.head_hidden, recipe.head_hidden), nn.GELU(),
                                 nn.Linear(recipe.head_hidden, recipe.head_bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last = nn.utils.parametrizations.weight_norm(
            nn.Linear(recipe.head_bottleneck, recipe.prototypes, bias=False))
        # the norm ("original0") stays 1: only the directions of the prototypes learn (DINO's norm_last_layer)
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


def encode_tokens(vit: nn.Module, images: torch.Tensor, masks: torch.Tensor | None = None,
                  mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """timm ViT forward with iBOT masking: B x 3 x H x W -> B x (prefix + N) x C (final norm applied).
    ``masks`` (B x h x w bool, the patch grid) replaces those patch embeddings by ``mask_token`` (1 x C)
    before the position embeddings are added, as iBOT and DINOv2 do."""
    x = vit.patch_embed(images)  # B x h x w x C (dynamic image size: NHWC)
    if masks is not None:
        x = torch.where(masks[..., None], mask_token.to(x.dtype).view(1, 1, 1, -1), x)
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
    return vit.norm(vit.blocks(x))


def effective_rank(features: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of N x C features (Roy & Vetterli): C for
    isotropic features, 1 for features on a line (collapse)."""
    x = features.float() - features.float().mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


def collapse_monitors(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float,
                      patch_features: torch.Tensor) -> dict[str, float]:
    """What detects collapse: the teacher's mean per-sample entropy and the entropy of its batch-mean
    distribution (both / log K: near 0 and near 0 = one prototype for all, the classic collapse; near
    1 and 1 = uniform, the other one), and the effective rank of the patch features."""
    probs = F.softmax((teacher_logits.float() - center) / temp, dim=-1)
    log_k = math.log(probs.shape[-1])
    per_sample = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean() / log_k
    mean = probs.mean(0)
    usage = -(mean * torch.log(mean.clamp_min(1e-12))).sum() / log_k
    return {"teacher_entropy": float(per_sample), "teacher_usage_entropy": float(usage),
            "feature_rank": effective_rank(patch_features)}


class SelfDistillation(nn.Module):
    """Student (the backbone's timm model + heads + mask token) and its EMA teacher, and the loss.

    Only ``student`` is optimised; ``teacher`` follows by :meth:`update_teacher`. The backbone that is
    kept afterwards is ``student.vit`` (DINO keeps the teacher; the two differ by the EMA only, and the
    student is the one dgss fine-tunes, as supervised pretraining did)."""

    def __init__(self, vit: nn.Module, recipe: SSLRecipe):
        super().__init__()
        if recipe.objective not in ("dino", "dino_ibot"):
            raise ValueError(f"unknown self-supervised objective {recipe.objective!r} (dino | dino_ibot)")
        self.recipe = recipe
        dim = vit.embed_dim
        self.student = nn.ModuleDict({"vit": vit, "cls_head": ProjectionHead(dim, recipe),
                                      "patch_head": ProjectionHead(dim, recipe)})
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("cls_center", torch.zeros(recipe.prototypes))
        self.register_buffer("patch_center", torch.zeros(recipe.prototypes))
        self.prefix = int(getattr(vit, "num_prefix_tokens", 1))

    def trainable_parameters(self):
        yield from (p for p in self.student.parameters() if p.requires_grad)
        yield self.mask_token

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)

    def freeze_last_layer(self, frozen: bool) -> None:
        for name in ("cls_head", "patch_head"):
            self.student[name].last.parametrizations.weight.original1.requires_grad_(not frozen)

    def _teacher_probs(self, logits: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        return F.softmax((logits - center) / self.recipe.teacher_temp, dim=-1)

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor | None,
                masks: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """``global_views``: 2B x 3 x G x G (view 1 of every image, then view 2); ``local_views``:
        LB x 3 x l x l or None; ``masks``: 2B x g x g bool (iBOT; None or all False: DINO only).
        Returns (loss, logs)."""
        r = self.recipe
        two_b = global_views.shape[0]
        b = two_b // 2
        use_ibot = r.objective == "dino_ibot" and masks is not None and bool(masks.any())
        with torch.no_grad():
            t_tokens = encode_tokens(self.teacher["vit"], global_views)
            t_cls = self.teacher["cls_head"](t_tokens[:, 0])
            t_cls_p = self._teacher_probs(t_cls, self.cls_center)
        s_tokens = encode_tokens(self.student["vit"], global_views, masks if use_ibot else None, self.mask_token)
        s_cls = [self.student["cls_head"](s_tokens[:, 0])]
        if local_views is not None and local_views.shape[0]:
            s_cls.append(self.student["cls_head"](encode_tokens(self.student["vit"], local_views)[:, 0]))
        s_logp = F.log_softmax(torch.cat(s_cls) / r.student_temp, dim=-1)  # (2B + LB) x K

        # DINO: every student view against each teacher global view, except a global view against itself
        views = s_logp.shape[0] // b
        dino, terms = s_logp.new_zeros(()), 0
        for t_view in range(2):
            target = t_cls_p[t_view * b:(t_view + 1) * b]
            for s_view in range(views):
                if s_view == t_view:
                    continue
                dino = dino - (target * s_logp[s_view * b:(s_view + 1) * b]).sum(-1).mean()
                terms += 1
        dino = dino / terms
        loss, logs = dino, {"dino": float(dino.detach())}

        t_patch = None
        if use_ibot:  # iBOT: at each masked patch, the teacher's distribution of that (unmasked) patch
            flat = masks.flatten(1)  # 2B x N
            with torch.no_grad():
                t_patch = self.teacher["patch_head"](t_tokens[:, self.prefix:][flat])
                t_patch_p = self._teacher_probs(t_patch, self.patch_center)
            s_patch = self.student["patch_head"](s_tokens[:, self.prefix:][flat])
            per_patch = -(t_patch_p * F.log_softmax(s_patch / r.student_temp, dim=-1)).sum(-1)
            # each masked image weighs the same, whatever its number of masked patches (iBOT)
            counts = flat.sum(1)
            weights = (1.0 / counts.clamp_min(1).float()).repeat_interleave(counts)
            ibot = (per_patch * weights).sum() / (counts > 0).sum()
            loss = loss + r.ibot_weight * ibot
            logs["ibot"] = float(ibot.detach())
        if r.koleo_weight > 0:  # KoLeo: -log of each class token's distance to its nearest neighbour
            z = F.normalize(s_tokens[:b, 0], dim=-1)
            dist = torch.cdist(z, z) + torch.eye(b, dtype=z.dtype) * 1e3
            koleo = -torch.log(dist.min(1).values + 1e-8).mean()
            loss = loss + r.koleo_weight * koleo
            logs["koleo"] = float(koleo.detach())

        with torch.no_grad():  # centering: the teacher's running mean logit is subtracted
            m = r.center_momentum
            self.cls_center.mul_(m).add_(t_cls.mean(0), alpha=1 - m)
            if t_patch is not None:
                self.patch_center.mul_(m).add_(t_patch.mean(0), alpha=1 - m)
            logs.update(collapse_monitors(t_cls, self.cls_center, r.teacher_temp,
                                          t_tokens[:b, self.prefix:].reshape(-1, t_tokens.shape[-1])))
        logs["loss"] = float(loss.detach())
        return loss, logs


def random_patch_masks(count: int, grid: int, recipe: SSLRecipe, generator: torch.Generator) -> torch.Tensor:
    """count x grid x grid bool: a ``mask_prob`` share of the views get a random ``mask_ratio`` share of
    their patches masked (iBOT's random masking); the rest none."""
    masks = torch.zeros(count, grid * grid, dtype=torch.bool)
    n = grid * grid
    for i in range(count):
        if torch.rand((), generator=generator) < recipe.mask_prob:
            lo, hi = recipe.mask_ratio
            k = max(1, int(round(n * float(lo + (hi - lo) * torch.rand((), generator=generator)))))
            masks[i, torch.randperm(n, generator=generator)[:k]] = True
    return masks.view(count, grid, grid)


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=generator))


def _view(image: torch.Tensor, size: int, scale: tuple[float, float], blur_prob: float, recipe: SSLRecipe,
          generator: torch.Generator) -> torch.Tensor:
    """One augmented view of a 3 x H x W float image in 0..1: random resized crop, flip, colour jitter,
    grayscale, Gaussian blur (DINO's pipeline without solarisation)."""
    import torchvision.transforms.v2.functional as TF

    _, h, w = image.shape
    area = h * w * _uniform(generator, *scale)
    ratio = math.exp(_uniform(generator, math.log(3 / 4), math.log(4 / 3)))
    ch = min(h, max(8, int(round(math.sqrt(area / ratio)))))
    cw = min(w, max(8, int(round(math.sqrt(area * ratio)))))
    top = int(torch.randint(0, h - ch + 1, (), generator=generator))
    left = int(torch.randint(0, w - cw + 1, (), generator=generator))
    x = TF.resized_crop(image, top, left, ch, cw, [size, size], antialias=True)
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(-1)
    if torch.rand((), generator=generator) < recipe.jitter_prob:
        x = TF.adjust_brightness(x, _uniform(generator, *recipe.brightness))
        x = TF.adjust_contrast(x, _uniform(generator, *recipe.contrast))
        x = TF.adjust_saturation(x, _uniform(generator, *recipe.saturation))
        x = TF.adjust_hue(x, _uniform(generator, -recipe.hue, recipe.hue))
    if torch.rand((), generator=generator) < recipe.grayscale_prob:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if torch.rand((), generator=generator) < blur_prob:
        sigma = _uniform(generator, 0.1, 2.0) * size / 224  # DINO's 0.1-2 px at 224, scaled to the view
        x = TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[max(sigma, 0.05)] * 2)
    return x.clamp(0, 1)


_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def multi_crop(images: torch.Tensor, recipe: SSLRecipe, generator: torch.Generator,
               second_look: torch.Tensor | None = None):
    """B x 3 x H x W uint8 -> (2B x 3 x G x G global views, view 1 of every image then view 2;
    LB x 3 x l x l local views or None), normalised with ImageNet's mean and std as dgss's data are.

    ``second_look`` (B x 3 x H x W uint8, the same scenes in another look: ``dgss.testbed.pool.pool_views``):
    global view 2 and every other local view are cut from it, so the teacher's target for a view of one
    look is a view of the other."""
    x = images.float() / 255.0
    y = x if second_look is None else second_look.float() / 255.0
    globals_ = [torch.stack([_view(img, recipe.global_size, recipe.global_scale, recipe.blur_prob[v], recipe,
                                   generator) for img in (x if v == 0 else y)]) for v in range(2)]
    locals_ = [torch.stack([_view(img, recipe.local_size, recipe.local_scale, recipe.blur_prob[2], recipe,
                                  generator) for img in (x if i % 2 == 0 else y)]) for i in range(recipe.local_crops)]
    g = (torch.cat(globals_) - _MEAN) / _STD
    loc = (torch.cat(locals_) - _MEAN) / _STD if locals_ else None
    return g, loc
