"""Int8 embedding tables in an exported ONNX graph: the weight-only step that makes the file small.

A transformer's token-embedding table is its largest tensor (MiniLM-L6: 11.7 M of 22.7 M parameters;
SmolLM2-135M: 28.3 M) and no PTQ method quantizes it, because a lookup does no arithmetic. Stored in
float, it caps the file-size gain of a W8A8 export (MiniLM-L6: 1.55x; SmolLM2: 2.6x, measured in
docs/benchmarks.md). This pass stores every Gather table
(a 2-D float initializer read row by row) as symmetric per-row int8 codes and a float scale per row:

    Gather(table (V, D) float, ids)  ->  Cast(Gather(codes (V, D) int8, ids)) * Gather(scales (V, 1), ids)

Only the looked-up rows are dequantized, so the cost per token is D multiplies. The codes are
``round(w / s)`` (ties to even, as ``numpy.rint``) with ``s = max|row| / 127``, so each value moves by
at most ``s / 2``: about 0.4 % of the row's largest entry. Standard ONNX ops only.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["quantize_embedding_tables", "row_int8"]


def row_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(V, D) float -> (codes (V, D) int8 in [-127, 127], scales (V, 1) float32). An all-zero row gets scale 1."""
    peak = np.abs(table).max(axis=1, keepdims=True).astype(np.float32)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(table / scales), -127, 127).astype(np.int8)
    return codes, scales


def quantize_embedding_tables(model: onnx.ModelProto) -> list[str]:
    """Rewrite ``model`` in place as the module doc says; returns the names of the tables it stored as int8.

    A table that another node also reads (a tied LM head) keeps its float copy for that reader."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    done: list[str] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if table is None or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2 or _axis(node) != 0:
            nodes.append(node)
            continue
        nodes.extend(_int8_lookup(graph, node, numpy_helper.to_array(table), table.name + ".int8." + str(len(done))))
        readers[table.name] -= 1
        done.append(table.name)
    del graph.node[:]
    graph.node.extend(nodes)
    unread = [i for i in graph.initializer if i.name in done and readers[i.name] == 0]
    for init in unread:
        graph.initializer.remove(init)
    return done


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _int8_lookup(graph: onnx.GraphProto, gather: onnx.NodeProto, table: np.ndarray, prefix: str) -> list[onnx.NodeProto]:
    """The four nodes that replace ``gather``, writing its output; adds their two initializers to ``graph``."""
    codes, scales = row_int8(table)
    graph.initializer.extend([numpy_helper.from_array(codes, prefix + ".codes"),
                              numpy_helper.from_array(scales, prefix + ".scales")])
    ids, out = gather.input[1], gather.output[0]
    return [helper.make_node("Gather", [prefix + ".codes", ids], [prefix + ".rows"], name=prefix + ".gather_codes"),
            helper.make_node("Cast", [prefix + ".rows"], [prefix + ".rows_f"], to=onnx.TensorProto.FLOAT,
                             name=prefix + ".cast"),
            helper.make_node("Gather", [prefix + ".scales", ids], [prefix + ".row_scales"],
                             name=prefix + ".gather_scales"),
            helper.make_node("Mul", [prefix + ".rows_f", prefix + ".row_scales"], [out], name=prefix + ".dequantize")]
