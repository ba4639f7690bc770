"""Backbone registry: every vision tower behind one `encode(images) -> features` API.

Two families, the same classes at every size:
- `hf-clip`: transformers' CLIPVisionModelWithProjection (offline tiny ViT, CLIP ViT-B/32, ViT-L/14).
- `open-clip`: OpenCLIP's TimmModel around a timm ConvNeXt (offline tiny ConvNeXt, convnext_base_w).
The offline bases are pretrained here (models.pretrain); the full-scale ones load from the hub or a
local copy (`base_options: {pretrained: ...}`) and also bring their image preprocessing and their
text tower (for the zero-shot heads, see dataset.parsing).
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import Registry
from models.updates import fingerprint

TextEncoder = Callable[[Sequence[str]], torch.Tensor]
"""texts -> their embeddings (n, d) in the image feature space (not normalised)."""
Preprocess = Callable[[Sequence[object]], torch.Tensor]
"""PIL images -> the normalised pixel batch (n, 3, H, W) the tower expects."""


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
    preprocess: Callable[..., Preprocess] | None = None  # (net, **options); None: the tasks come as tensors
    text_encoder: Callable[..., TextEncoder] | None = None  # (**options); None: prototype heads stand in

    @property
    def projection(self) -> tuple[str, ...]:
        """The parameters of the tower's output projection (into the image-text space)."""
        return PROJECTIONS[self.family]


PROJECTIONS = {"hf-clip": ("visual_projection.weight",), "open-clip": ("head.proj.weight",)}


BACKBONES: Registry[BackboneSpec] = Registry("backbone")
register_backbone = BACKBONES.register
get_backbone_spec = BACKBONES.lookup


class Backbone(nn.Module):
    """A vision tower; `net` is the model that LoRA adapters attach to and updates are saved from."""

    def __init__(self, spec: BackboneSpec, net: nn.Module, options: dict | None = None):
        super().__init__()
        self.spec = spec
        self.net = net
        self.options = dict(options or {})
        self._preprocess: Preprocess | None = None

    @property
    def preprocess(self) -> Preprocess | None:
        """The tower's own image preprocessing (loaded on first use; None for the offline bases)."""
        if self._preprocess is None and self.spec.preprocess is not None:
            self._preprocess = self.spec.preprocess(self.net, **self.options)
        return self._preprocess

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.spec.family == "hf-clip":
            return self.net(pixel_values=pixel_values).image_embeds
        return self.net(pixel_values)

    @contextmanager
    def class_token_readout(self) -> Iterator[None]:
        """Inside, an hf-clip tower's last layer computes its attention output projection and MLP for the class
        token alone, the only token its pooled output reads: the same features and loss with about a sixth
        less work on the offline ViT (bit for bit at inference on our CPUs, as each row of a matrix product
        is computed alone; in training the other tokens' zero gradients are no longer summed in). Other
        families are unchanged; nesting is harmless."""
        last = self.net.vision_model.encoder.layers[-1] if self.spec.family == "hf-clip" else None
        if last is None or "forward" in vars(last):
            yield
            return
        last.forward = types.MethodType(_class_token_layer, last)
        try:
            yield
        finally:
            del last.forward

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward (non-reentrant, so LoRA needs no input gradients)."""
        if self.spec.family == "hf-clip":
            self.net.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.net.set_grad_checkpointing(True)

    def text_encoder(self) -> TextEncoder:
        if self.spec.text_encoder is None:
            raise ValueError(f"backbone {self.spec.name!r} has no text tower; its tasks use prototype heads")
        return self.spec.text_encoder(**self.options)


def _class_token_layer(layer: nn.Module, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
    """transformers' CLIPEncoderLayer.forward, its output kept for the class token only (every token still
    serves as key and value)."""
    if attention_mask is not None:
        raise ValueError("the class-token readout takes no attention mask (a vision tower has none)")
    attn = layer.self_attn
    x = layer.layer_norm1(hidden_states)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[:-1] + (-1, attn.head_dim)).transpose(1, 2)

    # training: the class token's query alone; inference: every query, as the full layer, which keeps its bits
    queries = x[:, :1] if layer.training else x
    dropout = attn.dropout if layer.training else 0.0
    attended = F.scaled_dot_product_attention(heads(attn.q_proj(queries)), heads(attn.k_proj(x)), heads(attn.v_proj(x)),
                                              dropout_p=dropout, scale=attn.scale)[:, :, :1]
    h = hidden_states[:, :1] + attn.out_proj(attended.transpose(1, 2).reshape(hidden_states.shape[0], 1, -1))
    return h + layer.mlp(layer.layer_norm2(h))


def build_backbone(name: str, **options) -> Backbone:
    spec = get_backbone_spec(name)
    options = {**spec.options, **options}
    return Backbone(spec, spec.build(**options), options)


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


def _hub_load(what: str, load: Callable, source: str, default_id: str):
    """Runs a from_pretrained-style load, turning 'not found / no network' into advice.

    The load report is silenced: one tower of a full CLIP checkpoint always leaves the other's
    weights "unexpected"; missing or mismatched weights still raise.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load()
    except (OSError, ValueError, RuntimeError) as e:  # missing folder, bad id, no network, mismatched weights
        raise OSError(f"could not load the {what} of {source!r}: {e}\nWith no internet, download the model once "
                      f"elsewhere (huggingface-cli download {default_id}) and pass "
                      f"--base_options '{{pretrained: /path/to/folder}}'.") from None
    finally:
        hf_logging.set_verbosity(verbosity)


class HFClip:
    """One full-scale transformers CLIP checkpoint: vision tower, image processor, text tower."""

    def __init__(self, default_id: str):
        self.default_id = default_id

    def vision(self, pretrained: str | None = None, revision: str | None = None) -> nn.Module:
        from transformers import CLIPVisionModelWithProjection

        source = pretrained or self.default_id
        return _hub_load("vision tower", lambda: CLIPVisionModelWithProjection.from_pretrained(
            source, revision=revision).eval(), source, self.default_id)

    def preprocess(self, net: nn.Module, pretrained: str | None = None, revision: str | None = None) -> Preprocess:
        from transformers import CLIPImageProcessor

        source = pretrained or self.default_id
        processor = _hub_load("image processor", lambda: CLIPImageProcessor.from_pretrained(
            source, revision=revision), source, self.default_id)
        return lambda images: processor(images=list(images), return_tensors="pt")["pixel_values"]

    def text(self, pretrained: str | None = None, revision: str | None = None) -> TextEncoder:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        source = pretrained or self.default_id
        tokenizer = _hub_load("tokenizer", lambda: AutoTokenizer.from_pretrained(source, revision=revision),
                              source, self.default_id)
        model = _hub_load("text tower", lambda: CLIPTextModelWithProjection.from_pretrained(
            source, revision=revision).eval(), source, self.default_id)

        @torch.no_grad()
        def encode(texts: Sequence[str]) -> torch.Tensor:
            tokens = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                               max_length=model.config.max_position_embeddings)
            return model(**tokens).text_embeds
        return encode


def _register_hf_clip(name: str, default_id: str, description: str) -> None:
    clip = HFClip(default_id)
    register_backbone(BackboneSpec(name, "hf-clip", clip.vision, HF_CLIP_TARGETS, 224, CLIP_MEAN, CLIP_STD,
                                   description, preprocess=clip.preprocess, text_encoder=clip.text))


_register_hf_clip("clip-vit-b32", "openai/clip-vit-base-patch32", "OpenAI CLIP ViT-B/32 (transformers)")
_register_hf_clip("clip-vit-l14", "openai/clip-vit-large-patch14", "OpenAI CLIP ViT-L/14 (transformers)")


class OpenClip:
    """One OpenCLIP model: `model_name` (a built-in config or one added from `config_file`) and
    `pretrained` (a tag such as laion2b_s13b_b82k, or a local .safetensors/.bin file)."""

    @staticmethod
    def create(model_name: str, pretrained: str | None, config_file: str | None = None):
        import open_clip

        if config_file is not None:
            if not Path(config_file).is_file():
                raise OSError(f"OpenCLIP model config {config_file!r} does not exist")
            open_clip.add_model_config(config_file)
        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown OpenCLIP model {model_name!r}; pass --base_options "
                             f"'{{config_file: /path/to/{model_name}.json}}' for a custom one")
        try:
            return open_clip.create_model(model_name, pretrained=pretrained, device="cpu")
        except (OSError, RuntimeError, ValueError) as e:  # no network, missing or mismatched file
            raise OSError(f"could not load OpenCLIP {model_name} weights {pretrained!r}: {e}\nWith no internet, "
                          f"download the checkpoint once elsewhere (open_clip_pytorch_model.bin of the "
                          f"laion/CLIP-convnext_base_w-laion2B-s13B-b82K hub repo) and pass "
                          f"--base_options '{{pretrained: /path/to/open_clip_pytorch_model.bin}}'.") from None

    @classmethod
    def vision(cls, model_name: str, pretrained: str | None = None, config_file: str | None = None) -> nn.Module:
        return cls.create(model_name, pretrained, config_file).visual.eval()

    @staticmethod
    def preprocess(net: nn.Module, **options) -> Preprocess:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        transform = image_transform_v2(PreprocessCfg(**net.preprocess_cfg), is_train=False)
        return lambda images: torch.stack([transform(image) for image in images])

    @classmethod
    def text(cls, model_name: str, pretrained: str | None = None, config_file: str | None = None) -> TextEncoder:
        import open_clip

        model = cls.create(model_name, pretrained, config_file).eval()
        tokenizer = open_clip.get_tokenizer(model_name)

        @torch.no_grad()
        def encode(texts: Sequence[str]) -> torch.Tensor:
            return model.encode_text(tokenizer(list(texts)))
        return encode


register_backbone(BackboneSpec(
    "convnext-base-w", "open-clip", OpenClip.vision, CONVNEXT_TARGETS, 256, CLIP_MEAN, CLIP_STD,
    "OpenCLIP ConvNeXt-Base (wide), LAION-2B", options={"model_name": "convnext_base_w",
                                                        "pretrained": "laion2b_s13b_b82k"},
    preprocess=OpenClip.preprocess, text_encoder=OpenClip.text))


@dataclass
class Base:
    backbone: Backbone
    fingerprint: str
    name: str
    options: dict  # what build_backbone needs to rebuild exactly this base


def load_base(name: str, options: dict | None = None, device: torch.device | str = "cpu") -> Base:
    options = {k: v for k, v in (options or {}).items() if v is not None}
    backbone = build_backbone(name, **options)
    fp = fingerprint(backbone.net.state_dict())
    for p in backbone.parameters():
        p.requires_grad_(False)
    return Base(backbone.to(device).eval(), fp, name, options)
