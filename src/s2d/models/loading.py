"""Load a pretrained model for a task: an s2d asset name, a local Hugging Face directory, a Hub id
(only with network access) or ``timm:NAME``. ``trust_remote_code`` is never used.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from s2d import assets
from s2d.assets.dinov2_onnx import IMAGENET_MEAN, IMAGENET_STD
from s2d.models.wrappers import CausalLMClassifier, NaFlexClassifier, TimmClassifier, label_token_ids

logger = logging.getLogger(__name__)

__all__ = ["TASKS", "CAUSAL_LM_FAMILIES", "ModelBundle", "load", "with_label_words"]

TASKS = ("classification", "causal-lm", "backbone")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_FAMILY = {"bert": "bert", "mpnet": "mpnet", "dinov2": "dinov2", "vit": "vit", "siglip": "siglip",
           "siglip2": "siglip", "clip": "clip", "qwen2": "qwen2", "llama": "llama"}
CAUSAL_LM_FAMILIES = ("qwen2", "llama")      # classified through label-word likelihoods (CausalLMClassifier)
_IMAGE_FAMILIES = {"dinov2", "vit", "siglip", "clip", "timm-vit"}
_DEFAULT_STATS = {"dinov2": (IMAGENET_MEAN, IMAGENET_STD), "vit": ((0.5,) * 3, (0.5,) * 3),
                  "siglip": ((0.5,) * 3, (0.5,) * 3), "clip": (CLIP_MEAN, CLIP_STD)}


@dataclass
class ModelBundle:
    """A loaded model with what its inputs need."""
    model: nn.Module                                # the torch model (eval mode after loading)
    modality: str                                   # "text" or "image"
    family: str                                     # "bert", "mpnet", "dinov2", "vit", "siglip", "clip", ...
    name: str                                       # what it was loaded from (asset, path, hub id)
    tokenizer: PreTrainedTokenizerBase | None = None  # text models only
    image_size: int | None = None                   # input resolution in pixels (image models)
    image_mean: tuple[float, ...] | None = None     # per-channel normalisation (image models)
    image_std: tuple[float, ...] | None = None
    num_labels: int | None = None                   # classifier outputs (None: not a classifier)


def _resolve(name_or_path: str) -> str:
    """A local directory to load from (fetching an asset), or the Hub id itself."""
    if name_or_path in assets.REGISTRY:
        if assets.get(name_or_path).kind != "model":
            raise ValueError(f"asset {name_or_path!r} is a dataset, not a model")
        return str(assets.fetch(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model directory (config.json missing)")
        return str(path)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise FileNotFoundError(f"model {name_or_path!r} is not an s2d asset ({', '.join(sorted(assets.REGISTRY))}) "
                                f"nor a local directory, and HF_HUB_OFFLINE is set, so it cannot be downloaded")
    return name_or_path


def _preprocessing(src: str, family: str, config: PretrainedConfig) -> tuple[int | None, tuple | None, tuple | None]:
    pre = Path(src) / "preprocessor_config.json"
    mean, std = _DEFAULT_STATS.get(family, (None, None))
    size = getattr(getattr(config, "vision_config", config), "image_size", None)
    if pre.is_file():
        info = json.loads(pre.read_text())
        mean, std = tuple(info.get("image_mean", mean)), tuple(info.get("image_std", std))
        s = info.get("crop_size") or info.get("size") or {}
        size = s.get("height") or s.get("shortest_edge") or size
    return size, mean, std


def _resize_positions(model: nn.Module, image_size: int) -> nn.Module:
    """Rebuild a ViT/CLIP/SigLIP classifier for ``image_size`` with bicubically resized position tables."""
    vcfg = getattr(model.config, "vision_config", model.config)
    if image_size % vcfg.patch_size:
        raise ValueError(f"image_size must be a multiple of the patch size {vcfg.patch_size}, got {image_size}")
    grid = image_size // vcfg.patch_size
    sd = model.state_dict()
    for key, t in sd.items():
        if key.endswith("position_embeddings") or key.endswith("position_embedding.weight"):
            table = t.reshape(-1, t.shape[-1])
            n_cls = table.shape[0] - math.isqrt(table.shape[0]) ** 2
            g = math.isqrt(table.shape[0] - n_cls)
            pos = table[n_cls:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
            pos = nn.functional.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
            new = torch.cat([table[:n_cls], pos.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(t.dtype)])
            sd[key] = new.reshape(*t.shape[:-2], -1, t.shape[-1]) if t.dim() == 3 else new
    vcfg.image_size = image_size
    rebuilt = type(model)(model.config)
    rebuilt.load_state_dict(sd, strict=True)
    return rebuilt


def _load_timm(name: str, task: str, num_labels: int | None, image_size: int | None) -> ModelBundle:
    try:
        import timm
    except Exception as err:  # torchvision/timm unusable in this environment
        raise ValueError(f"model {name!r} needs the timm package, which cannot be imported: {err}") from None
    kwargs = {"img_size": image_size} if image_size else {}
    net = timm.create_model(name.split(":", 1)[1], pretrained=True, num_classes=num_labels or 0, **kwargs)
    cfg = timm.data.resolve_data_config(model=net)
    model = TimmClassifier(net) if task == "classification" else net
    return ModelBundle(model=model, modality="image", family="timm-vit", name=name, tokenizer=None,
                       image_size=int(cfg["input_size"][-1]), image_mean=tuple(cfg["mean"]),
                       image_std=tuple(cfg["std"]), num_labels=num_labels)


def load(name_or_path: str, task: str = "classification", num_labels: int | None = None,
         image_size: int | None = None) -> ModelBundle:
    """Load a model for ``task`` ("classification" | "causal-lm" | "backbone") as a :class:`ModelBundle`.

    Classification builds ``*ForSequenceClassification`` for text encoders and
    ``*ForImageClassification`` for ViTs (DINOv2: CLS + mean patch token -> Linear) with a new head of
    ``num_labels`` outputs on the pretrained encoder. A causal LM (``CAUSAL_LM_FAMILIES``) keeps its LM
    head and is wrapped in :class:`CausalLMClassifier`, which scores the placeholder tokens 0, 1, ...
    until :func:`with_label_words` names the answer words. ``image_size`` (pixels) overrides the input
    resolution; position embeddings are interpolated.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "classification" and (num_labels is None or num_labels < 2):
        raise ValueError(f"num_labels must be >= 2 for classification, got {num_labels}")
    if name_or_path.startswith("timm:"):
        return _load_timm(name_or_path, task, num_labels, image_size)
    src = _resolve(name_or_path)
    try:
        config = tf.AutoConfig.from_pretrained(src, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load a model config from {name_or_path!r}: {err}") from None
    family = _FAMILY.get(config.model_type.replace("_vision_model", ""))
    if family is None:
        raise ValueError(f"{name_or_path}: unsupported model_type {config.model_type!r}; "
                         f"supported: {', '.join(sorted(_FAMILY))}")
    if task == "causal-lm" and family not in CAUSAL_LM_FAMILIES:
        raise ValueError(f"task 'causal-lm' needs a causal LM (qwen2, llama), {name_or_path} is {family}")
    modality = "image" if family in _IMAGE_FAMILIES else "text"
    tokenizer = _tokenizer(src, name_or_path) if modality == "text" else None
    if task == "classification" and family in CAUSAL_LM_FAMILIES:
        if tokenizer is None:
            raise ValueError(f"{name_or_path}: a causal LM needs its tokenizer to be used as a classifier")
        lm = _from_pretrained(src, config, "causal-lm", modality, None, tokenizer)
        model = CausalLMClassifier(lm, range(num_labels))   # placeholder answer tokens until with_label_words
    else:
        model = _from_pretrained(src, config, task, modality, num_labels, tokenizer)
    bundle = ModelBundle(model=model, modality=modality, family=family, name=name_or_path, tokenizer=tokenizer,
                         num_labels=num_labels if task == "classification" else None)
    if modality == "image":
        _fit_image_input(bundle, src, config, task, image_size)
    bundle.model.eval()
    return bundle


def with_label_words(bundle: ModelBundle, words: list[str]) -> ModelBundle:
    """The bundle of a :class:`CausalLMClassifier` scoring ``words`` (one single-token word per class)."""
    if not isinstance(bundle.model, CausalLMClassifier):
        raise ValueError(f"label words apply to a causal LM loaded for classification ({', '.join(CAUSAL_LM_FAMILIES)}); "
                         f"{bundle.name} holds a {type(bundle.model).__name__}")
    model = CausalLMClassifier(bundle.model.lm, label_token_ids(bundle.tokenizer, words))
    return dataclasses.replace(bundle, model=model.train(bundle.model.training), num_labels=len(words))


def _tokenizer(src: str, name: str) -> PreTrainedTokenizerBase | None:
    try:
        return tf.AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        logger.warning("no tokenizer for %s: %s", name, err)
        return None


def _from_pretrained(src: str, config: PretrainedConfig, task: str, modality: str, num_labels: int | None,
                     tokenizer: PreTrainedTokenizerBase | None) -> nn.Module:
    """The pretrained weights under the task's auto class (a new head of ``num_labels`` outputs)."""
    kw: dict[str, object] = {"trust_remote_code": False}
    if task == "classification":
        kw["num_labels"] = num_labels
        if tokenizer is not None and getattr(config, "pad_token_id", None) is None:
            kw["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    auto = {"backbone": tf.AutoModel, "causal-lm": tf.AutoModelForCausalLM,
            "classification": tf.AutoModelForSequenceClassification if modality == "text"
            else tf.AutoModelForImageClassification}[task]
    return auto.from_pretrained(src, **kw)


def _fit_image_input(bundle: ModelBundle, src: str, config: PretrainedConfig, task: str,
                     image_size: int | None) -> None:
    """Set the bundle's image size and normalisation; resize position tables or wrap NaFlex models."""
    size, bundle.image_mean, bundle.image_std = _preprocessing(src, bundle.family, config)
    naflex = config.model_type.startswith("siglip2")
    if image_size is not None:
        if bundle.family != "dinov2" and not naflex and image_size != size:
            # DINOv2 interpolates its positions in the forward, SigLIP2 (NaFlex) to each image's grid
            bundle.model = _resize_positions(bundle.model, image_size)
        size = image_size
    if naflex and task == "classification":
        vcfg = getattr(config, "vision_config", config)   # NaFlex: a square grid of num_patches by default
        size = size or math.isqrt(vcfg.num_patches) * vcfg.patch_size
        bundle.model = NaFlexClassifier(bundle.model, vcfg.patch_size)
    bundle.image_size = size
