"""Transformer layouts by module names: blocks, Linear roles, classifier heads and FFN Linears.

A *layout* names, relative to one transformer block, its attention module, q/k/v, attention output,
FFN Linears and LayerNorms. ``blocks`` finds the layout that matches the most blocks of a model
(duck typing over ``named_modules``: BERT, MPNet, DINOv2, ViT, CLIP/SigLIP vision, timm ViT,
Llama/Qwen2), so quantization, probes and reports never need model-specific code. To support a
new family, add a :class:`_Layout` to ``LAYOUTS``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from s2d.colinearity import PAIR_KINDS, Pair

__all__ = ["BlockInfo", "LAYOUTS", "HEAD_LEAVES", "blocks", "linear_roles", "head_names", "ffn_modules",
           "is_ffn_name", "colinearity_pairs"]


@dataclass
class BlockInfo:
    """One transformer block of a model, by full dotted module names."""
    name: str                  # the block module, e.g. "bert.encoder.layer.0"
    attention: str             # the module whose forward computes softmax(q kᵀ) v
    qkv: list[str]             # q, k, v Linears (one name for a fused qkv Linear)
    attn_out: str              # attention output projection
    fc1: list[str]             # FFN input Linear(s) (gate and up for a gated MLP)
    fc2: str                   # FFN output Linear
    attn_in_norm: str | None   # the LayerNorm feeding q/k/v (None: the first post-LN block's has none)
    mlp_in_norm: str | None    # the LayerNorm feeding fc1
    post_ln: bool              # post-LN block (BERT, MPNet): those norms also feed the residual stream


@dataclass(frozen=True)
class _Layout:
    """Module names relative to a block, for one model family."""
    family: str                # family name (for reading only)
    attention: str             # attention module
    qkv: tuple[str, ...]       # q, k, v (or one fused qkv)
    attn_out: str              # attention output projection
    fc1: tuple[str, ...]       # FFN input Linear(s)
    fc2: str                   # FFN output Linear
    attn_norm: str | None      # pre-LN: the norm before attention; post-LN: None
    mlp_norm: str              # the norm feeding fc1
    out_norm: str | None = None  # post-LN only: the block-output LayerNorm


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
HEAD_LEAVES = ("classifier", "score", "lm_head", "head")   # module names of classifier heads
_HEAD_PARENTS = ("classifier", "score")                     # heads made of several Linears (RoBERTa/MPNet)
# FFN Linears by name, for models no layout matches (the roles are used when one does)
_FFN_NAME = re.compile(r"(intermediate\.dense|(?<!attention\.)output\.dense|fc1|fc2|mlp\.|ffn|"
                       r"gate_proj|up_proj|down_proj)")


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


def head_names(model: nn.Module) -> set[str]:
    """Names of the classifier-head Linears: the output embedding, Linears named classifier / score /
    lm_head / head, and the Linears inside a ``classifier`` or ``score`` module."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = set()
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        parts = name.split(".")
        if m is out_emb or parts[-1] in HEAD_LEAVES or (len(parts) > 1 and parts[-2] in _HEAD_PARENTS):
            heads.add(name)
    return heads


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
    heads = head_names(model)
    return {name: roles.get(name, "head" if name in heads else "other")
            for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def is_ffn_name(name: str) -> bool:
    """Whether a module name looks like an FFN Linear (for models whose blocks are not recognised)."""
    return bool(_FFN_NAME.search(name))


def ffn_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The FFN Linears (fc1/fc2 roles) of a transformer by dotted name, in module order.

    Uses the block layout when one matches; otherwise the common FFN module names.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    roles = linear_roles(model)
    chosen = {n: m for n, m in linears.items() if roles.get(n) in ("fc1", "fc2")}
    return chosen or {n: m for n, m in linears.items() if is_ffn_name(n)}


def colinearity_pairs(model: nn.Module, kinds: tuple[str, ...] = PAIR_KINDS) -> list[Pair]:
    """Colinearity Decay's ordered pairs of every block, from the block layout (not from name strings).

    ``"attn"``: attention value -> output projection (the v rows of a fused qkv Linear; grouped-query
    kv heads repeated for the query heads they feed); ``"ffn"``: FFN up -> down (the up projection of
    a gated MLP, the up half of a fused SwiGLU input). Empty for a model no layout matches.
    """
    unknown = [k for k in kinds if k not in PAIR_KINDS]
    if unknown:
        raise ValueError(f"colinearity_pairs: unknown kinds {unknown}; allowed: {', '.join(PAIR_KINDS)}")
    modules = dict(model.named_modules())
    pairs = []
    for b in blocks(model):
        if "attn" in kinds:
            pairs.append(_value_pair(b, modules))
        if "ffn" in kinds:
            pairs.append(_up_pair(b, modules))
    return pairs


def _up_pair(block: BlockInfo, modules: dict[str, nn.Module]) -> Pair:
    """The (FFN up -> down) pair: a fused SwiGLU input Linear (gate and up stacked by rows, DINOv2's
    ``weights_in``) contributes its up half, the rows the gate multiplies."""
    up, reads = block.fc1[-1], modules[block.fc2].weight.shape[1]
    rows = modules[up].weight.shape[0]
    if len(block.fc1) == 1 and rows == 2 * reads:
        return Pair(up, block.fc2, "ffn", rows=(reads, rows))
    return Pair(up, block.fc2, "ffn")


def _value_pair(block: BlockInfo, modules: dict[str, nn.Module]) -> Pair:
    """The (value -> attention output) pair of one block."""
    v_name = block.qkv[-1]
    rows_out = modules[v_name].weight.shape[0]
    rows = None
    if len(block.qkv) == 1:          # fused qkv: q, k, v stacked by rows
        rows_out //= 3
        rows = (2 * rows_out, 3 * rows_out)
    reads = modules[block.attn_out].weight.shape[1]
    if reads == rows_out:
        return Pair(v_name, block.attn_out, "attn", rows=rows)
    head_dim = int(getattr(modules[block.attention], "head_dim", 0))   # grouped-query attention
    return Pair(v_name, block.attn_out, "attn", rows=rows, head_dim=head_dim, kv_repeat=reads // rows_out)
