"""``--format fused``: one ``qsdonnx::QsdMatMul`` node computes ``X·(deq(Q) + deq(L)·deq(R) + S) + bias``.

The op reads each quantized matrix in MatMulNBits packing (see ``custom_ops/``).  A MatMul or
Gemm whose parts the op cannot take (a dense factor, a block that is not a power of two ≥ 16,
a float16 model) keeps the portable DequantizeLinear form, with the reason recorded; Conv and
Gather weights always do.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..factorize.packing import to_matmulnbits
from ..factorize.types import QuantizedMatrix
from ..factorize.types import container_width
from ..graph import float_tensor, node_key
from ..runtime import DOMAIN, OP_NAME, OP_VERSION, register_onnx_schema
from .bias import GraphIndex, bias_add_of
from .canonicalize import node_attrs
from .lower_nbits import nbits_unsupported
from .lower_qdq import LowerQdqPass, QdqEmitter, lower_matmul_like


def fused_unsupported(em: QdqEmitter) -> str:
    f = em.f
    if em.dtype != "float32":
        return f"{em.dtype} model (the fused op takes float32 activations)"
    for label, part in (("Q", f.q), ("L", f.left), ("R", f.right)):
        if part is not None:
            why = nbits_unsupported(part)
            if why:
                return f"{label}: {why}"
    return ""


class LowerFusedPass(LowerQdqPass):
    name = "lower-fused"
    left_fallback = "MatMul's first input: the fused op takes its weight second (DequantizeLinear)"

    def __init__(self, accuracy_level: int = 0):
        self.accuracy_level = accuracy_level

    def _packed(self, em: QdqEmitter, label: str, m: QuantizedMatrix) -> list[str]:
        B, scales, zp = to_matmulnbits(m)
        return [
            em.nbits_codes(label, m, B),
            em.edit.add_initializer(float_tensor(f"{em.base}.{label}_scale", scales, "float16")),
            em.edit.add_initializer(numpy_helper.from_array(zp, f"{em.base}.{label}_zero_point")),
        ]

    def lower_matmul(self, edit, em: QdqEmitter, node: onnx.NodeProto, rec) -> list[onnx.NodeProto]:
        why = fused_unsupported(em)
        if why:
            rec.extra.setdefault("fallback", []).append(f"{why} (DequantizeLinear)")
            return lower_matmul_like(edit, em, node)
        f = em.f
        K, N = f.shape
        attrs = node_attrs(node)
        tag = node_key(node)
        nodes: list[onnx.NodeProto] = []
        x = node.input[0]
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            t = edit.node("Transpose", [x], f"{tag}.qsd.transA", perm=[1, 0])
            nodes.append(t)
            x = t.output[0]
        if "fused_inputs" not in em._cache:
            inputs = [""] * 13
            op_attrs = dict(K=K, N=N, q_bits=0, q_block=0, rank=0, l_bits=0, l_block=0, r_bits=0, r_block=0,
                            has_sparse=0, has_bias=0, act_int8=1 if self.accuracy_level >= 4 else 0)
            if f.q is not None:
                inputs[1:4] = self._packed(em, "Q", f.q)
                op_attrs.update(q_bits=container_width(f.q.bits), q_block=f.q.block_size)
            if f.left is not None:
                inputs[4:7] = self._packed(em, "L", f.left)
                inputs[7:10] = self._packed(em, "R", f.right)
                op_attrs.update(rank=f.rank, l_bits=container_width(f.left.bits), l_block=f.left.block_size,
                                r_bits=container_width(f.right.bits), r_block=f.right.block_size)
            if f.sparse is not None:
                sp = f.sparse
                order = np.lexsort((sp.cols, sp.rows))
                rows, cols = sp.rows[order], sp.cols[order]
                rowptr = np.zeros(K + 1, np.int32)
                np.add.at(rowptr, rows.astype(np.int64) + 1, 1)
                rowptr = np.cumsum(rowptr).astype(np.int32)
                inputs[10] = edit.add_initializer(numpy_helper.from_array(rowptr, f"{em.base}.S_rowptr"))
                inputs[11] = edit.add_initializer(numpy_helper.from_array(cols.astype(np.int32), f"{em.base}.S_cols"))
                inputs[12] = edit.add_initializer(float_tensor(f"{em.base}.S_values", sp.values[order], "float16"))
                op_attrs["has_sparse"] = 1
            em._cache["fused_inputs"] = (inputs, op_attrs)
        inputs, op_attrs = em._cache["fused_inputs"]
        inputs = [x] + list(inputs[1:])
        op_attrs = dict(op_attrs)
        out = node.output[0]
        bias_term = None
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            c_init = next((t for t in edit.graph.initializer if t.name == node.input[2]), None)
            beta = float(attrs.get("beta", 1.0))
            if c_init is not None and tuple(c_init.dims) in ((N,), (1, N)):
                c = (edit.array(c_init).reshape(N) * beta).astype(np.float32)
                inputs.append(edit.add_initializer(numpy_helper.from_array(c, f"{em.base}.bias")))
                em.other_bytes += c.nbytes
                op_attrs["has_bias"] = 1
            else:
                bias_term = node.input[2]
                if beta != 1.0:
                    b = em.const("beta", np.array(beta, np.float32), "float32")
                    em.other_bytes += 4
                    mul = edit.node("Mul", [bias_term, b], f"{tag}.qsd.beta")
                    nodes.append(mul)
                    bias_term = mul.output[0]
        elif node.op_type == "MatMul":
            add, bias = self._bias_add(edit, node, N)
            if add is not None:
                # Exporters write Linear as MatMul then Add: the op adds the bias itself, and the
                # Add goes (the bias initializer is reused, not copied).
                inputs += [""] * (13 - len(inputs)) + [bias]
                op_attrs["has_bias"] = 1
                out = add.output[0]
                edit.replace_node(add, [])
        while inputs and inputs[-1] == "":
            inputs.pop()
        fused = edit.node(OP_NAME, inputs, f"{tag}.qsd.fused", domain=DOMAIN,
                          outputs=None if bias_term else [out], **op_attrs)
        nodes.append(fused)
        if bias_term:
            nodes.append(edit.node("Add", [fused.output[0], bias_term], f"{tag}.qsd.bias", outputs=[out]))
        return nodes

    def _bias_add(self, edit, node: onnx.NodeProto, N: int):
        """The ``Add`` of a constant float32 ``(N,)`` bias that is the only reader of ``node``'s
        output, and that bias's name; ``(None, None)`` otherwise."""
        if getattr(self, "_index", None) is None:
            self._index = GraphIndex(edit.graph)
        add, other = bias_add_of(self._index, node)
        t = self._index.inits.get(other) if add is not None else None
        if t is None or t.data_type != onnx.TensorProto.FLOAT or tuple(t.dims) != (N,):
            return None, None
        return add, other

    def begin(self, ctx) -> None:
        self._index = None
        register_onnx_schema()  # lets onnx.checker and shape inference see the op's output type
        super().begin(ctx)

    def finish(self, ctx) -> str:
        summary = super().finish(ctx)
        if any(n.domain == DOMAIN for n in ctx.model.graph.node) and \
                not any(op.domain == DOMAIN for op in ctx.model.opset_import):
            ctx.model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OP_VERSION))
        return summary
