"""Where each backbone's pretrained weights file is downloaded: the address a missing-weights error names.

The addresses are the projects' own release links (the files the shipped configs name in
``configs/_base_/*.yaml``); dgss never downloads them itself, except with ``model.weights: hub`` (timm's
copies). DINOv3 is released after a request form, so its entry is the page with the form.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["WEIGHT_SOURCES", "download_address", "download_hint"]

_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/dinov2_vit{size}14{reg}_pretrain.pth"
_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"

# backbone name -> the official file's download address
WEIGHT_SOURCES: dict[str, str] = {
    **{f"dinov2_{s}": _DINOV2.format(size=s, reg="") for s in ("s", "b", "l", "g")},
    **{f"dinov2_{s}_reg": _DINOV2.format(size=s, reg="_reg4") for s in ("s", "b", "l", "g")},
    "eva02_l": "https://huggingface.co/Yuxin-CV/EVA-02/resolve/main/eva02/pt/eva02_L_pt_m38m_p14.pt",
    "clip_l": "https://openaipublic.azureedge.net/clip/models/"
              "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "sam_b": _SAM + "sam_vit_b_01ec64.pth",
    "sam_l": _SAM + "sam_vit_l_0b3195.pth",
    "sam_h": _SAM + "sam_vit_h_4b8939.pth",
    "mae_l": "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth",
    **{f"dinov3_{s}": "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ (request form)"
       for s in ("s", "b", "l", "hplus", "7b")},
}


def download_address(backbone: str) -> str | None:
    """The official weights address of ``backbone`` (a registered name), or None (timm-only files)."""
    return WEIGHT_SOURCES.get(backbone)


def download_hint(backbone: str, path: str | os.PathLike) -> str:
    """The end of a missing-weights error: where the file comes from and where it must go ("" if unknown)."""
    address = download_address(backbone)
    if address is None:
        return (f"; model.weights: hub downloads timm's copy of {backbone}, or give the path of a timm "
                ".safetensors/.pth file")
    folder = Path(path).parent
    if Path(path).name != address.split(" ")[0].rsplit("/", 1)[-1] and not address.endswith("(request form)"):
        # another file than the official one (the user's own weights): say where the official one is
        return f"; set model.weights=PATH to where it is (the official {backbone} weights: {address})"
    if address.startswith("https://") and " " not in address:
        fetch = f"download it with `mkdir -p {folder} && wget -O {path} {address}`"
    else:
        fetch = f"download it from {address} into {folder}"
    return f"; {fetch}, or set model.weights=PATH to where it is"
