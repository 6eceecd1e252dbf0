"""Shared test helpers: tiny configurations of every backbone family."""

import pytest
import torch

# timm constructor overrides that make each family tiny (a few blocks, width 32).
TINY_VIT = dict(depth=4, embed_dim=32, num_heads=2)
TINY_SAM = dict(depth=4, embed_dim=32, num_heads=2, global_attn_indexes=(1, 3), window_size=4)
TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
TINY_RESNET = dict(layers=[1, 1, 1, 1])


def tiny_overrides(name: str) -> dict:
    if name.startswith("sam"):
        return dict(TINY_SAM)
    if name.startswith("convnext"):
        return dict(TINY_CONVNEXT)
    if name.startswith("resnet"):
        return dict(TINY_RESNET)
    return dict(TINY_VIT)


# pytest-xdist runs one worker per core: more intra-op threads per worker only oversubscribe the CPU.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
