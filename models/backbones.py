"""Backbone registry: every vision tower behind one `encode(images) -> features` API.

Two families, the same classes at every size:
- `hf-clip`: transformers' CLIPVisionModelWithProjection (offline tiny ViT, CLIP ViT-B/32, ViT-L/14).
- `open-clip`: OpenCLIP's TimmModel around a timm ConvNeXt (offline tiny ConvNeXt, convnext_base_w).
The offline bases are pretrained here (models.pretrain); the full-scale ones load from the hub.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # "hf-clip" | "open-clip"
    build: Callable[..., nn.Module]  # (**options) -> the vision network with its weights
    lora_targets: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str = ""
    options: dict = field(default_factory=dict)


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in BACKBONES:
        raise ValueError(f"backbone {spec.name!r} registered twice")
    BACKBONES[spec.name] = spec
    return spec


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; registered: {sorted(BACKBONES)}") from None


class Backbone(nn.Module):
    """A vision tower; `net` is the model that LoRA adapters attach to and updates are saved from."""

    def __init__(self, spec: BackboneSpec, net: nn.Module):
        super().__init__()
        self.spec = spec
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.spec.family == "hf-clip":
            return self.net(pixel_values=pixel_values).image_embeds
        return self.net(pixel_values)


def build_backbone(name: str, **options) -> Backbone:
    spec = get_backbone_spec(name)
    return Backbone(spec, spec.build(**{**spec.options, **options}))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
CONVNEXT_TARGETS = ("fc1", "fc2")


def _offline(name):
    def build(**options):
        from models.pretrain import load_or_pretrain

        return load_or_pretrain(name, **options)
    return build


register_backbone(BackboneSpec(
    "offline-vit", "hf-clip", _offline("offline-vit"), HF_CLIP_TARGETS, 32, (0.5,) * 3, (0.5,) * 3,
    "tiny transformers CLIP vision tower (patch 8, width 128, 4 layers), pretrained here"))
register_backbone(BackboneSpec(
    "offline-convnext", "open-clip", _offline("offline-convnext"), CONVNEXT_TARGETS, 32, (0.5,) * 3, (0.5,) * 3,
    "tiny OpenCLIP TimmModel ConvNeXt (dims 32-256, depths 1-1-2-1), pretrained here"))


def _hf_clip_vision(default_id: str):
    def build(pretrained: str | None = None, revision: str | None = None):
        """CLIP vision tower with projection from the hub id (or a local folder via `pretrained`)."""
        from transformers import CLIPVisionModelWithProjection

        source = pretrained or default_id
        try:
            return CLIPVisionModelWithProjection.from_pretrained(source, revision=revision).eval()
        except (OSError, ValueError) as e:  # missing folder, bad id, or no network
            raise OSError(f"could not load CLIP weights {source!r}: {e}\nWith no internet, download them once "
                          f"elsewhere (huggingface-cli download {default_id}) and pass "
                          f"--base_options '{{pretrained: /path/to/folder}}'.") from None
    return build


register_backbone(BackboneSpec(
    "clip-vit-b32", "hf-clip", _hf_clip_vision("openai/clip-vit-base-patch32"), HF_CLIP_TARGETS, 224,
    CLIP_MEAN, CLIP_STD, "OpenAI CLIP ViT-B/32 vision tower (transformers)"))
register_backbone(BackboneSpec(
    "clip-vit-l14", "hf-clip", _hf_clip_vision("openai/clip-vit-large-patch14"), HF_CLIP_TARGETS, 224,
    CLIP_MEAN, CLIP_STD, "OpenAI CLIP ViT-L/14 vision tower (transformers)"))
