"""The demo's "foundation" ViT: a small DINOv2-shaped model pretrained by dgss on many domains.

    path = foundation_weights()                      # the shipped file (dgss/assets), or the cache
    pretrain_foundation("vit.safetensors")           # how that file was made (`dgss demo --pretrain-foundation`)

What makes DINOv2 a good starting point for domain generalization is that it has seen images of
every kind before anyone fine-tunes it. The stand-in here has seen every synthetic domain (clean,
textured, night, fog, rain, colour shift, other geometry), on scenes that no demo split uses
(seeds from ``PRETRAIN_SEED_OFFSET`` on; the demo trains on seeds 0.. and evaluates on 10,000,000..),
with a different and coarser task than the demo's: the 7 Cityscapes categories (flat, construction,
object, nature, sky, human, vehicle) through a linear per-patch classifier that is thrown away. Only
the backbone is kept, in timm's layout, so ``build_backbone(..., weights=path)`` loads it like any
pretrained file.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data.synthetic import DOMAINS, generate

__all__ = ["FOUNDATION", "FOUNDATION_FILE", "PRETRAIN", "CATEGORY_OF_TRAIN_ID", "CATEGORIES",
           "pretrain_command", "build_foundation_backbone", "pretrain_foundation", "foundation_weights"]

# The architecture: timm's DINOv2 ViT-S made small (6 blocks, width 96); patch 16 as in every
# published Rein/FisherTune setting; position grid for 128 x 128 crops (resized on the fly for others).
FOUNDATION = dict(backbone="dinov2_s", img_size=128, patch_size=16,
                  backbone_kwargs=dict(depth=6, embed_dim=96, num_heads=3))

# The recipe of the shipped file. Changing any value changes the file (and the demo's numbers).
PRETRAIN = dict(iters=600, batch_size=16, lr=1e-3, weight_decay=0.05, warmup_iters=60, seed=0,
                image_size=[128, 256], domains=list(DOMAINS))

PRETRAIN_SEED_OFFSET = 50_000_000  # scene seeds of pretraining: disjoint from every demo split

FOUNDATION_FILE = Path(__file__).resolve().parent.parent / "assets" / "demo_foundation_vit.safetensors"

# Cityscapes categories of the 19 train ids (the official labels' categoryId - 1; void -> ignore).
CATEGORIES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
CATEGORY_OF_TRAIN_ID = np.full(256, 255, np.int64)
CATEGORY_OF_TRAIN_ID[:19] = [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6]

_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
_STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)


def pretrain_command(out: str | os.PathLike = "src/dgss/assets/demo_foundation_vit.safetensors") -> str:
    return f"dgss demo --pretrain-foundation {out}"


def build_foundation_backbone(weights: Optional[str] = None):
    from ..models.backbones import build_backbone

    return build_backbone(FOUNDATION["backbone"], weights=weights, img_size=FOUNDATION["img_size"],
                          patch_size=FOUNDATION["patch_size"], **FOUNDATION["backbone_kwargs"])


def _batch(iteration: int, batch_size: int, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``iteration``: fresh scenes, domains in turn, every other image mirrored.
    B x 3 x H x W normalised images, B x H x W category ids."""
    images, labels = [], []
    domains = PRETRAIN["domains"]
    for j in range(batch_size):
        index = iteration * batch_size + j
        image, label = generate(domains[index % len(domains)], PRETRAIN_SEED_OFFSET + index, size)
        if (index // len(domains)) % 2:
            image, label = image[:, ::-1], label[:, ::-1]
        images.append(torch.from_numpy(np.ascontiguousarray(image)))
        labels.append(torch.from_numpy(CATEGORY_OF_TRAIN_ID[label]))
    x = torch.stack(images).permute(0, 3, 1, 2).float()
    return (x - _MEAN) / _STD, torch.stack(labels)


def pretrain_foundation(out: str | os.PathLike, *, iters: Optional[int] = None, progress: bool = True) -> Path:
    """Pretrain the foundation ViT (``PRETRAIN``; ``iters`` overrides the length) and write its
    backbone to ``out`` (safetensors, timm layout, the recipe and command in the metadata)."""
    from tqdm import tqdm

    from ..fileio import save_safetensors

    recipe = dict(PRETRAIN, iters=int(iters if iters is not None else PRETRAIN["iters"]))
    torch.manual_seed(recipe["seed"])
    backbone = build_foundation_backbone()
    dim = backbone.embed_dim
    # the probe reads the last two pyramid inputs (stride 16, the token grid) and is discarded after
    probe = torch.nn.Conv2d(2 * dim, len(CATEGORIES), 1)
    params = list(backbone.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    backbone.train()
    start = time.time()
    bar = tqdm(range(recipe["iters"]), desc="pretrain foundation ViT", disable=not progress, dynamic_ncols=True)
    for it in bar:
        warm = recipe["warmup_iters"]
        scale = (it + 1) / warm if it < warm else 0.5 * (1 + math.cos(math.pi * (it - warm) / max(recipe["iters"] - warm, 1)))
        for group in optimizer.param_groups:
            group["lr"] = recipe["lr"] * scale
        images, labels = _batch(it, recipe["batch_size"], recipe["image_size"])
        feats = backbone(images)
        logits = probe(torch.cat([feats[2], F.interpolate(feats[3], size=feats[2].shape[-2:], mode="bilinear",
                                                          align_corners=False)], 1))
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if it % 10 == 0:
            accuracy = (logits.argmax(1) == labels).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}", refresh=False)
    out = Path(out)
    state = {k: v.detach().contiguous() for k, v in backbone.model.state_dict().items()}
    meta = {"command": pretrain_command(out), "architecture": json.dumps(FOUNDATION),
            "recipe": json.dumps(recipe), "objective": "7 Cityscapes categories, linear probe on blocks "
            f"{list(backbone.out_indices[2:])}, cross-entropy", "seed_offset": str(PRETRAIN_SEED_OFFSET),
            "final_loss": f"{loss.item():.4f}", "seconds": f"{time.time() - start:.0f}"}
    return save_safetensors(state, out, metadata=meta)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dgss"


def foundation_weights(*, progress: bool = True) -> Path:
    """The foundation ViT's file: the one shipped with dgss, else one pretrained now and cached in
    ``~/.cache/dgss`` (a source checkout without the asset, e.g. while the recipe changes)."""
    if FOUNDATION_FILE.is_file():
        return FOUNDATION_FILE
    cached = _cache_dir() / FOUNDATION_FILE.name
    if not cached.is_file():
        print(f"the foundation ViT is not shipped in this installation: pretraining it once "
              f"({PRETRAIN['iters']} iterations), cached as {cached}", flush=True)
        partial = pretrain_foundation(cached.with_suffix(".partial.safetensors"), progress=progress)
        partial.replace(cached)
    return cached
