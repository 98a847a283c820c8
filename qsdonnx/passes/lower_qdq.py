"""The portable lowering: block-wise ``DequantizeLinear`` feeding ``MatMul`` / ``Conv`` chains.

For a weight factorized as ``W ≈ deq(Q) + deq(L)·deq(R) + S`` a MatMul ``Y = X·W`` becomes
``X·deq(Q) + (X·deq(L))·deq(R) + X·S``; Gemm keeps its bias (``beta·C``) and transA; a Conv
with group 1 and a low-rank part becomes a k×k Conv with ``r`` filters followed by a 1×1 Conv;
a Gather table gathers the packed codes of the requested rows and dequantizes only those.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..factorize.packing import level_digits, level_words, pack_bits, pack_stream, unpack_bits
from ..factorize.pq import ProductQuantizedMatrix
from ..factorize.trellis import TrellisTable
from ..factorize.qsd_dictionary import DictionaryMatrix, index_bits
from ..factorize.vq import VectorQuantizedMatrix, order_dtype
from ..factorize.types import (CODES_PER_WORD, LEVEL_WORDS, DenseMatrix, Factorization, QuantizedMatrix,
                               SparseMatrix, SparseQuantizedMatrix, container_width)
from ..graph import INT_TYPES, GraphEdit, node_key, float_tensor, int_tensor
from .base import Context, Pass, WeightRecord
from .aliases import IN_PLACE_OPS, RECURRENT_OPS
from .canonicalize import node_attrs

MIN_OPSET = 21
INT2_OPSET = 25


def required_opset(ctx: Context) -> int:
    """Block-wise DequantizeLinear needs opset 21; 2-bit integer types need 25."""
    need = MIN_OPSET
    for name, f in ctx.factorizations.items():
        rec = ctx.record(name)
        for part in (f.q, f.left, f.right):
            if isinstance(part, QuantizedMatrix):
                need = max(need, _opset_for_codes(rec, part.bits))
    return need


def _opset_for_codes(rec: WeightRecord, bits: int) -> int:
    return INT2_OPSET if rec.view != "embedding" and bits <= 2 else MIN_OPSET


class QdqEmitter:
    """Emits the nodes and initializers that rebuild one factorized weight."""

    def __init__(self, edit: GraphEdit, rec: WeightRecord, f: Factorization):
        self.edit = edit
        self.rec = rec
        self.f = f
        self.dtype = rec.dtype
        self.onnx_dtype = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        self.prelude: list[onnx.NodeProto] = []
        self.base = f"{rec.name}.qsd"
        self._cache: dict[str, str] = {}
        self.other_bytes = 0  # new bytes that replace something other than the weight

    # -- weight parts -------------------------------------------------------------------------
    def scales(self, part: str, qm: QuantizedMatrix, s: np.ndarray) -> str:
        """The scale initializer (``s``: ``qm``'s scales laid out as the codes are), cast to the
        model's float type when stored narrower."""
        name = self.edit.add_initializer(float_tensor(f"{self.base}.{part}_scale", s, qm.scale_dtype))
        if qm.scale_dtype != self.dtype:
            # Cast the (small) scale tensor rather than the (large) dequantized weight.
            node = self.edit.node("Cast", [name], f"{self.base}.{part}_scale_cast", to=self.onnx_dtype)
            self.prelude.append(node)
            name = node.output[0]
        return name

    def dequant(self, part: str, m, transpose: bool) -> str:
        """Float tensor of ``m`` (``(K, N)``, or ``(N, K)`` when ``transpose``); blocks run along K."""
        key = f"{part}:{transpose}"
        if key in self._cache:
            return self._cache[key]
        if isinstance(m, SparseQuantizedMatrix):
            out = self.sparse_factor(part, m, transpose)
        elif isinstance(m, DenseMatrix):
            v = m.values.T if transpose else m.values
            out = self.edit.add_initializer(float_tensor(f"{self.base}.{part}", v, self.dtype))
        elif isinstance(m, (VectorQuantizedMatrix, DictionaryMatrix)):
            out = self.vq_weight(part, m) if isinstance(m, VectorQuantizedMatrix) else self.dictionary_weight(part, m)
            if transpose:
                out = self._n("Transpose", [out], f"{part}_t", perm=[1, 0])
        else:
            codes = m.codes.T if transpose else m.codes
            scales = m.scales.T if transpose else m.scales
            zp = None if m.symmetric else (m.zero_points.T if transpose else m.zero_points)
            width = codes.shape[1]
            store_bits = m.bits
            pad = 0
            if container_width(m.bits) == 2 and width % 4:
                # ONNX Runtime 1.31 decodes 2-bit DequantizeLinear inputs wrongly when the last
                # dimension is not a multiple of 4.  Columns (not the blocked axis) are padded
                # with zero codes and sliced off after; along the blocked axis the codes move to
                # a 4-bit container, and the report counts those bytes.
                if transpose:
                    store_bits = 4
                else:
                    pad = (-width) % 4
                    codes = np.pad(codes, ((0, 0), (0, pad)))
                    scales = np.pad(scales, ((0, 0), (0, pad)), constant_values=1.0)
                    if zp is not None:
                        zp = np.pad(zp, ((0, 0), (0, pad)))
            if m.levels is None and store_bits == container_width(store_bits):
                codes_name = self.edit.add_initializer(int_tensor(f"{self.base}.{part}", codes, store_bits, m.symmetric))
            else:
                codes_name = self.container_codes(part, codes, store_bits, m.symmetric, m.levels)
            inputs = [codes_name, self.scales(part, m, scales)]
            if zp is not None:
                inputs.append(self.edit.add_initializer(int_tensor(f"{self.base}.{part}_zero_point", zp, store_bits, False)))
            node = self.edit.node("DequantizeLinear", inputs, f"{self.base}.{part}_dq",
                                  axis=1 if transpose else 0, block_size=m.block_size)
            self.prelude.append(node)
            out = node.output[0]
            if pad:
                sl = self.edit.node("Slice", [out, self.const(f"{part}_start", np.array([0], np.int64), "int64"),
                                              self.const(f"{part}_end", np.array([width], np.int64), "int64"),
                                              self.const(f"{part}_axis", np.array([1], np.int64), "int64")],
                                    f"{self.base}.{part}_unpad")
                self.prelude.append(sl)
                out = sl.output[0]
        self._cache[key] = out
        return out

    def small_floats(self, part: str, dtype: str, **tensors: np.ndarray) -> list[str]:
        """Initializers ``<weight>.qsd.<part>_<name>`` stored as ``dtype``, cast to the model's
        float type when it differs (the small tensors are cast, not the weight they build)."""
        names = [self.edit.add_initializer(float_tensor(f"{self.base}.{part}_{label}", v, dtype))
                 for label, v in tensors.items()]
        if dtype != self.dtype:
            names = [self._n("Cast", [t], f"{part}_{label}_cast", to=self.onnx_dtype)
                     for label, t in zip(tensors, names)]
        return names

    def vq_weight(self, part: str, m: VectorQuantizedMatrix) -> str:
        """``(K, N)`` float weight of vector codes: the codes, held as ``(G, P, N)`` (G codebooks,
        P vectors of each group per column), look up their group's codebook with GatherND
        (``batch_dims=1``) to ``(G, P, N, dim)``; a transpose to ``(G, P, dim, N)`` and a flatten
        give the rows in visiting order, which the column scales multiply and a Gather with
        the inverse order puts back in place.  All inputs are constants: ONNX Runtime folds the
        decoding into one float weight when it creates the session."""
        G, k, dim = m.codebooks.shape
        u = m.codes.reshape(G, -1, m.codes.shape[1])
        if m.code_bits < 8:
            codes = self.narrow_codes(part, u, m.code_bits)
        else:
            codes = self.edit.add_initializer(numpy_helper.from_array(u.astype(np.uint8), f"{self.base}.{part}_codes"))
        idx = self._n("Unsqueeze", [self._n("Cast", [codes], f"{part}_index", to=onnx.TensorProto.INT64),
                                    self.edit.shared_const("axes_last", [-1], "int64")], f"{part}_index_unsq")
        books, scales = self.small_floats(part, m.scale_dtype, codebooks=m.codebooks, col_scale=m.col_scales)
        vec = self._n("GatherND", [books, idx], f"{part}_lookup", batch_dims=1)  # (G, P, N, dim)
        rows = self._n("Flatten", [self._n("Transpose", [vec], f"{part}_vectors_t", perm=[0, 1, 3, 2])],
                       f"{part}_rows", axis=3)  # (K, N) in visiting order
        w = self._n("Mul", [rows, scales], f"{part}_scaled")
        inverse = np.argsort(m.order).astype(order_dtype(m.shape[0]))
        inv = self.edit.add_initializer(numpy_helper.from_array(inverse, f"{self.base}.{part}_inverse_order"))
        return self._n("Gather", [w, self._n("Cast", [inv], f"{part}_inverse_i32", to=onnx.TensorProto.INT32)],
                       f"{part}_rows_in_place", axis=0)

    def dictionary_weight(self, part: str, m: DictionaryMatrix) -> str:
        """``(K, N)`` float weight of QSD sub-vector codes: the atom indices, held as
        ``(keep, P, N)``, gather their atoms to ``(keep, P, N, dim)``; the signed coefficients
        (a stream offset by ``2^(b-1)``) multiply them, the ``keep`` terms are summed, and a
        transpose to ``(P, dim, N)`` and a flatten give the rows, which the column scales
        multiply.  All inputs are constants: ONNX Runtime folds the decoding into one float
        weight when it creates the session."""
        ib = index_bits(m.atoms)
        idx = (self.narrow_codes(f"{part}_index", m.index, ib) if ib < 8 else
               self.edit.add_initializer(numpy_helper.from_array(m.index.astype(np.uint8), f"{self.base}.{part}_index")))
        cb = m.coef_bits
        offset = 1 << (cb - 1)
        u = (m.coefs.astype(np.int16) + offset).astype(np.uint8)
        coef = (self.narrow_codes(f"{part}_coef", u, cb) if cb < 8 else
                self.edit.add_initializer(numpy_helper.from_array(u, f"{self.base}.{part}_coef")))
        coef = self._n("Sub", [self._n("Cast", [coef], f"{part}_coef_int8", to=onnx.TensorProto.INT8),
                               self.edit.shared_const(f"code_offset{cb}", np.array(offset), "int8")], f"{part}_coef_signed")
        coef = self._n("Unsqueeze", [self._n("Cast", [coef], f"{part}_coef_float", to=self.onnx_dtype),
                                     self.edit.shared_const("axes_last", [-1], "int64")], f"{part}_coef_unsq")
        atoms, scales = self.small_floats(part, m.scale_dtype, dictionary=m.dictionary, col_scale=m.col_scales)
        vec = self._n("Mul", [self._n("Gather", [atoms, self._n("Cast", [idx], f"{part}_index_i32", to=onnx.TensorProto.INT32)],
                                      f"{part}_atoms", axis=0), coef], f"{part}_terms")  # (keep, P, N, dim)
        if m.keep > 1:
            vec = self._n("ReduceSum", [vec, self.edit.shared_const("axes_first", [0], "int64")], f"{part}_vectors",
                          keepdims=1)
        # (1, P, N, dim) -> (1, P, dim, N) -> (K, N)
        rows = self._n("Flatten", [self._n("Transpose", [vec], f"{part}_vectors_t", perm=[0, 1, 3, 2])],
                       f"{part}_rows", axis=3)
        return self._n("Mul", [rows, scales], f"{part}_scaled")

    # -- codes of widths without an ONNX integer type (3, 5, 6, 7 bits) ------------------------
    def _n(self, op: str, inputs: list[str], label: str, **attrs) -> str:
        """A prelude node ``<weight>.qsd.<label>``; returns its output."""
        return _node_maker(self.edit, self.rec.name, self.prelude)(op, inputs, label, **attrs)

    def narrow_codes(self, label: str, u: np.ndarray, bits: int) -> str:
        """An integer tensor of the unsigned codes ``u`` (any shape, values below ``2^bits``),
        stored as a ``bits``-bit stream (``pack_stream``) and unpacked by constant nodes, which
        ONNX Runtime folds when it creates the session.  When the last axis is a multiple of 8
        the stream keeps the leading axes, so every shape constant is shared between weights."""
        last = u.shape[-1] if u.ndim else 1
        if u.ndim and last % 8 == 0:
            stream = pack_stream(u, bits).reshape(u.shape[:-1] + (last // 8, bits))
            x = self.edit.add_initializer(numpy_helper.from_array(stream, f"{self.base}.{label}_stream"))
            codes = unpack_stream_nodes(self._n, self.edit.shared_const, x, bits, label)
            keep = self.edit.shared_const(f"reshape_keep{u.ndim - 1}_join", [0] * (u.ndim - 1) + [-1], "int64")
            return self._n("Reshape", [codes, keep], f"{label}_codes")
        stream = pack_stream(u, bits)
        x = self.edit.add_initializer(numpy_helper.from_array(stream, f"{self.base}.{label}_stream"))
        flat = self._n("Reshape", [unpack_stream_nodes(self._n, self.edit.shared_const, x, bits, label),
                                   self.edit.shared_const("reshape_flat", [-1], "int64")], f"{label}_flat")
        if stream.shape[0] * 8 != u.size:
            flat = self._n("Slice", [flat, self.edit.shared_const("slice_start", [0], "int64"),
                                     self.const(f"{label}_count", np.array([u.size], np.int64), "int64")],
                           f"{label}_trim")
        return self._n("Reshape", [flat, self.const(f"{label}_shape", np.array(u.shape, np.int64), "int64")],
                       f"{label}_codes")

    def container_codes(self, part: str, codes: np.ndarray, bits: int, signed: bool,
                        levels: Optional[int] = None) -> str:
        """The INT4/UINT4 (INT8/UINT8 above 4 bits) tensor ``int_tensor`` would store for
        ``codes``, rebuilt from a ``bits``-bit stream (or, with ``levels``, from words of three
        codes): signed codes are stored offset by ``2^(bits-1)`` (``floor(levels / 2)``)."""
        offset = (levels // 2 if levels else 1 << (bits - 1)) if signed else 0
        u = (codes.astype(np.int64) + offset).astype(np.uint8)
        v = self.level_codes(part, u, levels) if levels else self.narrow_codes(part, u, bits)
        if offset:
            name = f"level{levels}_offset" if levels else f"code_offset{bits}"
            v = self._n("Sub", [self._n("Cast", [v], f"{part}_int8", to=onnx.TensorProto.INT8),
                                self.edit.shared_const(name, np.array(offset), "int8")], f"{part}_signed")
        return self._n("Cast", [v], f"{part}_container", to=INT_TYPES[(container_width(bits), signed)])

    def level_codes(self, label: str, u: np.ndarray, levels: int) -> str:
        """A uint8 tensor of the unsigned codes ``u`` (any shape, values below ``levels``), stored
        in words of three codes (``packing.level_words``): a word of up to 8 bits as a stream
        at its width, a wider one as its low byte and a stream of its high bits.  Constant nodes
        look each word's three codes up in a shared ``(L³, 3)`` table, which ONNX Runtime folds
        when it creates the session.  When the last axis is a multiple of 3 the words keep the
        leading axes; otherwise the codes are flattened and padded to whole words, then trimmed
        and reshaped."""
        w = LEVEL_WORDS[levels]
        keep = u.ndim > 0 and u.shape[-1] % CODES_PER_WORD == 0
        flat = u if keep else np.pad(u.reshape(-1), (0, (-u.size) % CODES_PER_WORD))
        words = level_words(flat, levels)
        if w == 8:
            idx = self._n("Cast", [self.edit.add_initializer(numpy_helper.from_array(
                words.astype(np.uint8), f"{self.base}.{label}_words"))], f"{label}_word_index", to=onnx.TensorProto.INT32)
        elif w < 8:
            idx = self._n("Cast", [self.narrow_codes(f"{label}_words", words.astype(np.uint8), w)],
                          f"{label}_word_index", to=onnx.TensorProto.INT32)
        else:
            low = self.edit.add_initializer(numpy_helper.from_array((words & 255).astype(np.uint8),
                                                                    f"{self.base}.{label}_words_low"))
            high = self.narrow_codes(f"{label}_words_high", (words >> 8).astype(np.uint8), w - 8)
            idx = self._n("Add", [self._n("Cast", [low], f"{label}_low_i32", to=onnx.TensorProto.INT32),
                                  self._n("Mul", [self._n("Cast", [high], f"{label}_high_i32", to=onnx.TensorProto.INT32),
                                                  self.edit.shared_const("word_high_weight", np.array(256), "int32")],
                                          f"{label}_high_weighted")], f"{label}_word_index")
        digits = self._n("Gather", [self.edit.shared_const(f"level{levels}_digits", level_digits(levels), "uint8"), idx],
                         f"{label}_digits", axis=0)  # (..., words, 3)
        if keep:
            return self._n("Reshape", [digits, self.edit.shared_const(f"reshape_keep{u.ndim - 1}_join",
                                                                       [0] * (u.ndim - 1) + [-1], "int64")],
                           f"{label}_codes")
        out = self._n("Reshape", [digits, self.edit.shared_const("reshape_flat", [-1], "int64")], f"{label}_flat")
        if flat.size != u.size:
            out = self._n("Slice", [out, self.edit.shared_const("slice_start", [0], "int64"),
                                    self.const(f"{label}_count", np.array([u.size], np.int64), "int64")],
                          f"{label}_trim")
        return self._n("Reshape", [out, self.const(f"{label}_shape", np.array(u.shape, np.int64), "int64")],
                       f"{label}_codes")

    def packed_codes(self, part: str, packed: np.ndarray, bits: int, cbits: int, delta: int,
                     levels: Optional[int] = None) -> str:
        """A uint8 tensor equal to ``packed`` (unsigned codes packed ``8 / cbits`` per byte along
        its last axis, as ``pack_bits`` writes them), stored at ``bits`` per code (or in words
        of three ``levels``-level codes): the codes minus ``delta`` are stored, and constant
        nodes add ``delta`` back and repack them."""
        per = 8 // cbits
        width = packed.shape[-1] * per
        v = (unpack_bits(packed, cbits, width).astype(np.int64) - delta).astype(np.uint8)
        codes = self.level_codes(part, v, levels) if levels else self.narrow_codes(part, v, bits)
        if delta:
            codes = self._n("Add", [codes, self.edit.shared_const(f"code_delta{delta}", np.array(delta), "uint8")],
                            f"{part}_shift")
        nd = packed.ndim
        grouped = self._n("Reshape", [codes, self.edit.shared_const(
            f"reshape_keep{nd - 1}_group{per}", [0] * (nd - 1) + [-1, per], "int64")], f"{part}_grouped")
        out = None
        for j in range(per):  # byte = Σ_j code_j << (cbits·j)
            c = self._n("Gather", [grouped, self.edit.shared_const(f"index{j}", np.array(j), "int64")],
                        f"{part}_slot{j}", axis=-1)
            if j:
                c = self._n("BitShift", [c, self.edit.shared_const(f"shift{cbits * j}", np.array(cbits * j), "uint8")],
                            f"{part}_place{j}", direction="LEFT")
            out = c if out is None else self._n("BitwiseOr", [out, c], f"{part}_or{j}")
        return out

    def nbits_codes(self, part: str, m: QuantizedMatrix, B: np.ndarray) -> str:
        """The MatMulNBits code tensor ``B`` of ``m`` (``to_matmulnbits``): an initializer, or
        rebuilt from ``m.bits``-bit codes when its container is wider.  Symmetric codes sit at
        ``2^(c-1)`` in a ``c``-bit container and are streamed offset by ``2^(bits-1)``."""
        cbits = container_width(m.bits)
        if m.levels is None and m.bits == cbits:
            return self.edit.add_initializer(numpy_helper.from_array(B, f"{self.base}.{part}_nbits"))
        half = m.levels // 2 if m.levels else 1 << (m.bits - 1)
        delta = (1 << (cbits - 1)) - half if m.symmetric else 0
        return self.packed_codes(f"{part}_nbits", B, m.bits, cbits, delta, m.levels)

    def sparse_factor(self, part: str, m: SparseQuantizedMatrix, transpose: bool) -> str:
        """A factor with ``k`` stored entries per column: the stored values are dequantized as a
        ``(k, cols)`` matrix, then scattered to their rows of a zero ``(rows, cols)`` matrix."""
        if m.bits is None:
            vals = self.edit.add_initializer(float_tensor(f"{self.base}.{part}_values", m.codes, m.value_dtype))
            if m.value_dtype != self.dtype:
                cast = self.edit.node("Cast", [vals], f"{self.base}.{part}_values_cast", to=self.onnx_dtype)
                self.prelude.append(cast)
                vals = cast.output[0]
        else:
            vals = self.dequant(f"{part}_values", QuantizedMatrix(
                codes=m.codes, scales=m.scales, zero_points=m.zero_points, bits=m.bits,
                block_size=m.block_size, scale_dtype=m.scale_dtype), False)
        idx = self.edit.add_initializer(numpy_helper.from_array(m.indices.astype(m.index_dtype),
                                                                f"{self.base}.{part}_rows"))
        idx64 = self.edit.node("Cast", [idx], f"{self.base}.{part}_rows_i64", to=onnx.TensorProto.INT64)
        shape = self.const(f"{part}_shape", np.array(m.shape, np.int64), "int64")
        zero = self.edit.node("ConstantOfShape", [shape], f"{self.base}.{part}_zeros",
                              value=helper.make_tensor("v", self.onnx_dtype, [1], [0]))
        dense = self.edit.node("ScatterElements", [zero.output[0], idx64.output[0], vals],
                               f"{self.base}.{part}_scatter", axis=0)
        self.prelude += [idx64, zero, dense]
        out = dense.output[0]
        if transpose:
            t = self.edit.node("Transpose", [out], f"{self.base}.{part}_T", perm=[1, 0])
            self.prelude.append(t)
            out = t.output[0]
        return out

    def sparse_dense(self, sp: SparseMatrix, transpose: bool) -> str:
        """Rebuilds a dense ``(K, N)`` (or ``(N, K)``) float tensor from sparse values + flat indices."""
        key = f"S:{transpose}"
        if key in self._cache:
            return self._cache[key]
        K, N = sp.shape
        rows, cols = (sp.cols, sp.rows) if transpose else (sp.rows, sp.cols)
        width = K if transpose else N
        flat = rows.astype(np.int64) * width + cols.astype(np.int64)
        idx_dtype = np.int32 if sp.index_bytes() == 4 else np.int64
        idx = self.edit.add_initializer(numpy_helper.from_array(flat.astype(idx_dtype), f"{self.base}.S_index"))
        vals = self.edit.add_initializer(float_tensor(f"{self.base}.S_values", sp.values, sp.value_dtype))
        total = K * N
        nodes = []
        cast_idx = self.edit.node("Cast", [idx], f"{self.base}.S_index_i64", to=onnx.TensorProto.INT64)
        unsq = self.edit.add_initializer(numpy_helper.from_array(np.array([1], np.int64), f"{self.base}.S_axes"))
        idx2 = self.edit.node("Unsqueeze", [cast_idx.output[0], unsq], f"{self.base}.S_index_2d")
        vals_cast = vals
        if sp.value_dtype != self.dtype:
            vc = self.edit.node("Cast", [vals], f"{self.base}.S_values_cast", to=self.onnx_dtype)
            nodes.append(vc)
            vals_cast = vc.output[0]
        zeros = self.edit.add_initializer(float_tensor(f"{self.base}.S_zeros_shape", np.array([total]), "int64"))
        zero = self.edit.node("ConstantOfShape", [zeros], f"{self.base}.S_zeros",
                              value=helper.make_tensor("v", self.onnx_dtype, [1], [0]))
        scatter = self.edit.node("ScatterND", [zero.output[0], idx2.output[0], vals_cast], f"{self.base}.S_scatter")
        shape = self.edit.add_initializer(float_tensor(
            f"{self.base}.S_shape", np.array([N, K] if transpose else [K, N]), "int64"))
        dense = self.edit.node("Reshape", [scatter.output[0], shape], f"{self.base}.S_dense")
        nodes += [cast_idx, idx2, zero, scatter, dense]
        self.prelude.extend(nodes)
        self._cache[key] = dense.output[0]
        return dense.output[0]

    def matmul(self, x: str, part: str, m, tag: str) -> onnx.NodeProto:
        """``x · deq(m)`` as one node (its inputs' dequantization goes to the prelude)."""
        return self.edit.node("MatMul", [x, self.dequant(part, m, False)], f"{tag}.qsd.matmul_{part.lower()}")

    def const(self, name: str, values, dtype: str) -> str:
        return self.edit.add_initializer(float_tensor(f"{self.base}.{name}", np.asarray(values), dtype))


def lower_matmul_like(edit: GraphEdit, em: QdqEmitter, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """``X·W`` (MatMul, Gemm) from the parts; returns the replacement nodes."""
    f = em.f
    nodes: list[onnx.NodeProto] = []
    attrs = node_attrs(node)
    x = node.input[0]
    tag = node_key(node)
    if node.op_type == "Gemm" and attrs.get("transA", 0):
        t = edit.node("Transpose", [x], f"{tag}.qsd.transA", perm=[1, 0])
        nodes.append(t)
        x = t.output[0]
    terms: list[str] = []
    if f.q is not None:
        mm = em.matmul(x, "Q", f.q, tag)
        nodes.append(mm)
        terms.append(mm.output[0])
    if f.left is not None:
        m1 = em.matmul(x, "L", f.left, tag)
        m2 = em.matmul(m1.output[0], "R", f.right, tag)
        nodes += [m1, m2]
        terms.append(m2.output[0])
    if f.sparse is not None:
        ms = edit.node("MatMul", [x, em.sparse_dense(f.sparse, False)], f"{tag}.qsd.matmul_s")
        nodes.append(ms)
        terms.append(ms.output[0])
    bias: Optional[str] = None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        beta = float(attrs.get("beta", 1.0))
        bias = node.input[2]
        if beta != 1.0:
            c_init = next((t for t in edit.graph.initializer if t.name == bias), None)
            if c_init is not None:
                c = edit.array(c_init)
                bias = edit.add_initializer(numpy_helper.from_array((c * beta).astype(c.dtype), f"{em.base}.beta_C"))
                # beta·C replaces C, not the weight: keep it out of the weight's byte count.
                em.other_bytes += c.nbytes
            else:
                b = em.const("beta", np.array(beta), em.dtype)
                em.other_bytes += np.dtype(em.dtype).itemsize  # scales C, not part of the weight
                mul = edit.node("Mul", [bias, b], f"{tag}.qsd.beta")
                nodes.append(mul)
                bias = mul.output[0]
    if bias is not None:
        terms.append(bias)
    _sum_into(edit, nodes, terms, node.output[0], tag)
    return nodes


def lower_matmul_left(edit: GraphEdit, em: QdqEmitter, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """``A·X`` with the constant ``A`` first (view ``Aᵀ ≈ Q + L·R + S``): ``deq(Qᵀ)·X +
    deq(Rᵀ)·(deq(Lᵀ)·X) + Sᵀ·X``. The codes are stored transposed, with DequantizeLinear's
    blocks along axis 1, so no Transpose runs on the weight."""
    f = em.f
    x = node.input[1]
    tag = node_key(node)
    nodes: list[onnx.NodeProto] = []
    terms: list[str] = []
    if f.q is not None:
        nodes.append(edit.node("MatMul", [em.dequant("Q", f.q, True), x], f"{tag}.qsd.matmul_q"))
        terms.append(nodes[-1].output[0])
    if f.left is not None:
        m1 = edit.node("MatMul", [em.dequant("L", f.left, True), x], f"{tag}.qsd.matmul_l")
        m2 = edit.node("MatMul", [em.dequant("R", f.right, True), m1.output[0]], f"{tag}.qsd.matmul_r")
        nodes += [m1, m2]
        terms.append(m2.output[0])
    if f.sparse is not None:
        nodes.append(edit.node("MatMul", [em.sparse_dense(f.sparse, True), x], f"{tag}.qsd.matmul_s"))
        terms.append(nodes[-1].output[0])
    _sum_into(edit, nodes, terms, node.output[0], tag)
    return nodes


def _sum_into(edit: GraphEdit, nodes: list, terms: list[str], out: str, tag: str) -> None:
    if len(terms) == 1:
        nodes.append(edit.node("Identity", terms, f"{tag}.qsd.out", outputs=[out]))
        return
    acc = terms[0]
    for k, t in enumerate(terms[1:], 1):
        last = k == len(terms) - 1
        add = edit.node("Add", [acc, t], f"{tag}.qsd.add{k}", outputs=[out] if last else None)
        nodes.append(add)
        acc = add.output[0]


def lower_conv(edit: GraphEdit, em: QdqEmitter, node: onnx.NodeProto, rec: WeightRecord) -> list[onnx.NodeProto]:
    """Conv from the parts: dequantized k×k kernel for Q; k×k Conv with r filters then 1×1 Conv for L·R."""
    f = em.f
    attrs = node_attrs(node)
    tag = node_key(node)
    O = rec.shape[0]
    kshape = list(rec.shape[2:])
    nodes: list[onnx.NodeProto] = []
    x = node.input[0]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    terms: list[str] = []
    base_attrs = {k: v for k, v in attrs.items()}

    def reshape(src: str, shape: list[int], label: str) -> str:
        s = em.const(f"{label}_shape", np.array(shape, np.int64), "int64")
        r = edit.node("Reshape", [src, s], f"{em.base}.{label}_kernel")
        em.prelude.append(r)
        return r.output[0]

    q_or_sparse = []
    if f.q is not None:
        q_or_sparse.append(em.dequant("Q", f.q, True))
    if f.sparse is not None:
        q_or_sparse.append(em.sparse_dense(f.sparse, True))
    if q_or_sparse:
        w2d = q_or_sparse[0]
        if len(q_or_sparse) > 1:
            add = edit.node("Add", q_or_sparse, f"{em.base}.QS")
            em.prelude.append(add)
            w2d = add.output[0]
        wq = reshape(w2d, list(rec.shape), "Q")
        conv = edit.node("Conv", [x, wq] + ([bias] if bias else []), f"{tag}.qsd.conv_q", **base_attrs)
        nodes.append(conv)
        terms.append(conv.output[0])
        bias = None
    if f.left is not None:
        r = f.rank
        I = rec.shape[1]
        w1 = reshape(em.dequant("L", f.left, True), [r, I] + kshape, "L")
        a1 = dict(base_attrs)
        if "kernel_shape" in a1:
            a1["kernel_shape"] = kshape
        conv1 = edit.node("Conv", [x, w1], f"{tag}.qsd.conv_l", **a1)
        w2 = reshape(em.dequant("R", f.right, True), [O, r] + [1] * len(kshape), "R")
        conv2 = edit.node("Conv", [conv1.output[0], w2] + ([bias] if bias else []), f"{tag}.qsd.conv_r",
                          kernel_shape=[1] * len(kshape))
        nodes += [conv1, conv2]
        terms.append(conv2.output[0])
    _sum_into(edit, nodes, terms, node.output[0], tag)
    return nodes


def lower_in_place(edit: GraphEdit, em: QdqEmitter, node: onnx.NodeProto, rec: WeightRecord) -> list[onnx.NodeProto]:
    """LSTM / GRU / RNN ``W`` or ``R``, and ConvTranspose's weight: the dequantized matrix
    (recurrent: its ``(gates·hidden, inputs)`` rows; ConvTranspose: ``(inputs, outputs·k)``)
    reshaped to the weight's shape and fed to the same node.

    The node is edited in place rather than replaced, since a recurrent node holds two weights
    (W and R) that are lowered one after the other."""
    w2d = em.dequant("Q", em.f.q, rec.op in RECURRENT_OPS)
    shape = em.const("W_shape", np.array(rec.shape, np.int64), "int64")
    reshape = edit.node("Reshape", [w2d, shape], f"{em.base}.weight")
    em.prelude.append(reshape)
    for i, name in enumerate(node.input):
        if name == rec.name:
            node.input[i] = reshape.output[0]
    return [node]


def lower_tensor(edit: GraphEdit, em: QdqEmitter, rec: WeightRecord) -> None:
    """A weight read only inside If/Loop/Scan bodies: its initializer gives way to the
    dequantized tensor of the same name, computed in the main graph (the bodies read it from
    the enclosing scope as before). The nodes go to ``em.prelude``."""
    w = em.dequant("Q", em.f.q, True)  # (rows, last axis)
    if len(rec.shape) > 2:
        shape = em.const("W_shape", np.array(rec.shape, np.int64), "int64")
        em.prelude.append(edit.node("Reshape", [w, shape], f"{em.base}.weight", outputs=[rec.name]))
    else:
        em.prelude.append(edit.node("Identity", [w], f"{em.base}.weight", outputs=[rec.name]))
    inits = edit.graph.initializer
    index = next(i for i, t in enumerate(inits) if t.name == rec.name)
    del inits[index]


def unpack_stream_nodes(n, const, x: str, bits: int, label: str) -> str:
    """Nodes decoding ``x``, a ``pack_stream`` tensor of shape ``(..., G, bits)`` uint8, to its
    codes ``(..., G, 8)`` uint8, with byte operations only (one byte per code at every step):
    code ``j`` starts at bit ``p = j·bits`` of its group, in byte ``p // 8`` at shift
    ``s = p % 8``, and when it runs over into the next byte that byte, shifted left by ``8 − s``,
    supplies its high bits (otherwise an appended zero byte does):
    ``code_j = ((byte[p // 8] >> s) | (byte_hi << (8 − s))) & (2^bits − 1)``.
    ``n(op, inputs, label, **attrs)`` adds a node and returns its output; ``const(name, values,
    dtype)`` adds a constant."""
    lo, hi, right, left = [], [], [], []
    for j in range(8):
        p = j * bits
        s = p % 8
        lo.append(p // 8)
        right.append(s)
        spans = s + bits > 8
        hi.append(p // 8 + 1 if spans else bits)  # index ``bits``: the appended zero byte
        left.append(8 - s if spans else 0)
    padded = n("Pad", [x, const("pad_last_one", [0, 1], "int64"), const("zero_u8", np.array(0), "uint8"),
                       const("axis_last", [-1], "int64")], f"{label}_pad", mode="constant")
    low = n("BitShift", [n("Gather", [padded, const(f"stream{bits}_low_byte", lo, "int32")], f"{label}_low", axis=-1),
                         const(f"stream{bits}_right", right, "uint8")], f"{label}_low_shift", direction="RIGHT")
    high = n("BitShift", [n("Gather", [padded, const(f"stream{bits}_high_byte", hi, "int32")], f"{label}_high", axis=-1),
                          const(f"stream{bits}_left", left, "uint8")], f"{label}_high_shift", direction="LEFT")
    joined = n("BitwiseOr", [low, high], f"{label}_join")
    return n("BitwiseAnd", [joined, const(f"code_mask{bits}", np.array((1 << bits) - 1), "uint8")], f"{label}_codes8")


def level_decoders(levels: int) -> set[tuple[str, int]]:
    """The shared decoders codes of ``levels`` values in words of three use (see
    ``QdqEmitter.level_codes``): their digit table, and the stream of the words (or of their
    high bits)."""
    w = LEVEL_WORDS[levels]
    out = {("levels", levels)}
    if w != 8:
        out.add(("stream", w if w < 8 else w - 8))
    return out


def shared_decode_bytes(decoders) -> int:
    """An upper bound on the bytes of the constants every weight shares (``GraphEdit.shared_const``)
    once codes are decoded by the given decoders (``("stream", width)``, ``("levels", L)``, as
    ``LayerChoice.decoders`` lists them): the planner keeps them out of the budget."""
    decoders = sorted(set(decoders))
    if not decoders:
        return 0
    edit = GraphEdit(helper.make_model(helper.make_graph([], "decode", [], [])))
    n = _node_maker(edit, "x", [])
    for kind, v in decoders:
        if kind == "stream":
            unpack_stream_nodes(n, edit.shared_const, "x", v, f"s{v}")
            edit.shared_const(f"code_offset{v}", np.array(1), "int8")
        else:
            edit.shared_const(f"level{v}_digits", level_digits(v), "uint8")
            edit.shared_const(f"level{v}_offset", np.array(1), "int8")
            edit.shared_const("word_high_weight", np.array(256), "int32")
    for rank in (1, 2, 3):
        edit.shared_const(f"reshape_keep{rank}_join", [0] * rank + [-1], "int64")
    for name in ("reshape_flat", "slice_start", "axes_last", "axes_first"):
        edit.shared_const(name, [0], "int64")
    return edit.new_initializer_bytes()


def _node_maker(edit: GraphEdit, tag: str, nodes: list[onnx.NodeProto]):
    """``n(op, inputs, label, **attrs)``: adds node ``<tag>.qsd.<label>`` to ``nodes``, returns its output."""
    def n(op, inputs, label, **kw):
        nd = edit.node(op, inputs, f"{tag}.qsd.{label}", **kw)
        nodes.append(nd)
        return nd.output[0]
    return n


def gather_unpacked(n, em: "QdqEmitter", table: str, ids: str, bits: int, label: str, count: int) -> str:
    """Rows ``ids`` of a table packed along its last axis (``8 / bits`` codes to a byte, lowest
    bits first, as :func:`pack_bits` writes them), unpacked to ``count`` codes."""
    g = n("Gather", [table, ids], f"gather_{label}", axis=0)
    if bits == 8:
        return g
    parts = []
    mask = em.const(f"{label}_mask", np.array((1 << bits) - 1, np.uint8), "uint8")
    axes = em.const(f"{label}_axes", np.array([-1], np.int64), "int64")
    for j in range(8 // bits):
        v = g
        if j:
            sh = em.const(f"{label}_shift{j}", np.array(j * bits, np.uint8), "uint8")
            v = n("BitShift", [g, sh], f"{label}_shift{j}", direction="RIGHT")
        v = n("BitwiseAnd", [v, mask], f"{label}_mask{j}")
        parts.append(n("Unsqueeze", [v, axes], f"{label}_unsq{j}"))
    g = n("Concat", parts, f"{label}_interleave", axis=-1)
    flat_shape = em.const(f"{label}_flat", np.array([-1], np.int64), "int64")
    lead = n("Slice", [n("Shape", [g], f"{label}_shape"), em.const(f"{label}_s0", np.array([0], np.int64), "int64"),
                       em.const(f"{label}_s1", np.array([-2], np.int64), "int64")], f"{label}_lead")
    g = n("Reshape", [g, n("Concat", [lead, flat_shape], f"{label}_flatshape", axis=0)], f"{label}_flatten")
    if (count * bits) % 8:
        # The last byte of each row holds padding codes: keep the first ``count``.
        g = n("Slice", [g, em.const(f"{label}_c0", np.array([0], np.int64), "int64"),
                        em.const(f"{label}_c1", np.array([count], np.int64), "int64"),
                        em.const(f"{label}_ax", np.array([-1], np.int64), "int64")], f"{label}_trim")
    return g


def lower_gather(edit: GraphEdit, em: QdqEmitter, node: onnx.NodeProto, rec: WeightRecord) -> list[onnx.NodeProto]:
    """Gather of an embedding table stored as packed codes: gather rows of codes and scales,
    unpack, then ``(u - zero_point) · scale`` on just those rows."""
    qm = em.f.q
    if isinstance(qm, ProductQuantizedMatrix):
        return lower_gather_pq(edit, em, node, qm)
    if isinstance(qm, TrellisTable):
        return lower_gather_trellis(edit, em, node, qm)
    tag = node_key(node)
    D, V = qm.shape
    bits = container_width(qm.bits)
    # Codes of a width without an integer container are stored per row as a stream of groups
    # of 8 codes in ``qm.bits`` bytes; the gathered rows are decoded at run time.
    narrow = qm.bits != bits
    code_bits = qm.bits if narrow else bits
    B = qm.block_size
    kb = D // B
    if qm.symmetric:
        u = (qm.codes.astype(np.int64) + (1 << (code_bits - 1))).T
        zp = None
    else:
        u = qm.codes.astype(np.int64).T
        zp = qm.zero_points.T  # (V, kb)
    groups = -(-D // 8)
    if narrow:
        rows = np.zeros((V, groups * 8), np.uint8)
        rows[:, :D] = u
        packed = pack_stream(rows, code_bits).reshape(V, groups, code_bits)
    else:
        packed = pack_bits(u.astype(np.uint8), bits)  # (V, D*bits/8)
    codes = edit.add_initializer(numpy_helper.from_array(packed, f"{em.base}.codes"))
    scales = edit.add_initializer(float_tensor(f"{em.base}.scales", qm.scales.T, qm.scale_dtype))
    ids = node.input[1]
    nodes: list[onnx.NodeProto] = []
    n = _node_maker(edit, tag, nodes)

    if narrow:
        g = unpack_stream_nodes(n, edit.shared_const, n("Gather", [codes, ids], "gather_codes", axis=0),
                                code_bits, "codes")  # (..., groups, 8)
        if groups * 8 != D:
            wide = n("Reshape", [g, n("Concat", [n("Shape", [ids], "ids_shape_codes"), em.const(
                "codes_width", np.array([groups * 8], np.int64), "int64")], "codes_rows", axis=0)], "codes_rows")
            g = n("Slice", [wide, em.const("codes_c0", np.array([0], np.int64), "int64"),
                            em.const("codes_c1", np.array([D], np.int64), "int64"),
                            em.const("codes_ax", np.array([-1], np.int64), "int64")], "codes_trim")
    else:
        g = gather_unpacked(n, em, codes, ids, bits, "codes", D)
    gs = n("Gather", [scales, ids], "gather_scales", axis=0)  # (..., kb)
    if qm.scale_dtype != em.dtype:
        gs = n("Cast", [gs], "scales_cast", to=em.onnx_dtype)
    # codes: (..., D) -> (..., kb, B); scales and zero points (..., kb) -> (..., kb, 1)
    blk = em.const("block_shape", np.array([kb, B], np.int64), "int64")
    shape_ids = n("Shape", [ids], "ids_shape")
    full = n("Concat", [shape_ids, blk], "blocked_shape", axis=0)
    cf = n("Cast", [g], "codes_float", to=em.onnx_dtype)
    cb = n("Reshape", [cf, full], "codes_blocked")
    if zp is None:
        z = em.const("zero_point", np.array(1 << (code_bits - 1)), em.dtype)
        cz = n("Sub", [cb, z], "center")
    else:
        zpk = edit.add_initializer(numpy_helper.from_array(pack_bits(zp.astype(np.uint8), bits),
                                                           f"{em.base}.zero_points"))
        gz = gather_unpacked(n, em, zpk, ids, bits, "zp", kb)
        gzf = n("Cast", [gz], "zp_float", to=em.onnx_dtype)
        axes = em.const("axes_last2", np.array([-1], np.int64), "int64")
        cz = n("Sub", [cb, n("Unsqueeze", [gzf, axes], "zp_unsq")], "center")
    axes = em.const("axes_last3", np.array([-1], np.int64), "int64")
    scaled = n("Mul", [cz, n("Unsqueeze", [gs, axes], "scale_unsq")], "scaled")
    dshape = em.const("row_shape", np.array([D], np.int64), "int64")
    out_shape = n("Concat", [shape_ids, dshape], "out_shape", axis=0)
    nodes.append(edit.node("Reshape", [scaled, out_shape], f"{tag}.qsd.rows", outputs=[node.output[0]]))
    return nodes


def lower_gather_pq(edit: GraphEdit, em: QdqEmitter, node: onnx.NodeProto,
                    pm: ProductQuantizedMatrix) -> list[onnx.NodeProto]:
    """Gather of a product-quantized table: gather the rows' codes, look each code up in its
    sub-space's codebook (flattened, so code ``c`` of sub-space ``s`` is entry ``s·2^cb + c``),
    and multiply by the gathered row scales."""
    tag = node_key(node)
    D, V = pm.shape
    S = D // pm.sub_dim
    k = 1 << pm.code_bits
    codes = edit.add_initializer(numpy_helper.from_array(pm.codes, f"{em.base}.codes"))
    books = edit.add_initializer(float_tensor(f"{em.base}.codebooks",
                                              pm.codebooks.reshape(S * k, pm.sub_dim), pm.scale_dtype))
    scales = edit.add_initializer(float_tensor(f"{em.base}.scales", pm.scales, pm.scale_dtype))
    offsets = edit.add_initializer(numpy_helper.from_array(
        (np.arange(S, dtype=np.int32) * k).astype(np.int32), f"{em.base}.code_offsets"))
    ids = node.input[1]
    nodes: list[onnx.NodeProto] = []
    n = _node_maker(edit, tag, nodes)

    g = n("Gather", [codes, ids], "gather_codes", axis=0)  # (..., S) uint8
    idx = n("Add", [n("Cast", [g], "codes_int", to=onnx.TensorProto.INT32), offsets], "code_index")
    sub = n("Gather", [books, idx], "lookup", axis=0)  # (..., S, d)
    shape_ids = n("Shape", [ids], "ids_shape")
    out_shape = n("Concat", [shape_ids, em.const("row_shape", np.array([D], np.int64), "int64")],
                  "out_shape", axis=0)
    rows = n("Reshape", [sub, out_shape], "rows_unscaled")
    gs = n("Unsqueeze", [n("Gather", [scales, ids], "gather_scales", axis=0),
                         em.const("axes_last", np.array([-1], np.int64), "int64")], "scale_unsq")
    if pm.scale_dtype != em.dtype:
        rows = n("Cast", [rows], "rows_cast", to=em.onnx_dtype)
        gs = n("Cast", [gs], "scales_cast", to=em.onnx_dtype)
    nodes.append(edit.node("Mul", [rows, gs], f"{tag}.qsd.rows", outputs=[node.output[0]]))
    return nodes


def lower_gather_trellis(edit: GraphEdit, em: QdqEmitter, node: onnx.NodeProto,
                         tt: TrellisTable) -> list[onnx.NodeProto]:
    """Gather of a trellis-coded table: gather the rows' symbols and unpack them, read each
    value's state from the last ``window`` symbols (zeros before the row's start), look the
    states up, multiply by the gathered row scales, and put the exact rows in place of theirs."""
    tag = node_key(node)
    D, V = tt.shape
    w = tt.window
    codes = edit.add_initializer(numpy_helper.from_array(tt.packed_symbols(), f"{em.base}.symbols"))
    lut = edit.add_initializer(float_tensor(f"{em.base}.lut", tt.lut, tt.scale_dtype))
    scales = edit.add_initializer(float_tensor(f"{em.base}.scales", tt.scales, tt.scale_dtype))
    ids = node.input[1]
    nodes: list[onnx.NodeProto] = []
    n = _node_maker(edit, tag, nodes)
    i32 = onnx.TensorProto.INT32

    sym = n("Cast", [gather_unpacked(n, em, codes, ids, tt.bits, "symbols", D)], "symbols_int", to=i32)  # (..., D)
    shape_ids = n("Shape", [ids], "ids_shape")
    lead_zeros = n("ConstantOfShape", [n("Concat", [shape_ids, em.const("history", np.array([w - 1], np.int64), "int64")],
                                        "history_shape", axis=0)],
                   "history", value=numpy_helper.from_array(np.zeros(1, np.int32)))
    padded = n("Concat", [lead_zeros, sym], "padded", axis=-1)  # (..., w - 1 + D)
    axes = em.const("axes_last", np.array([-1], np.int64), "int64")
    state = sym
    for i in range(1, w):
        # symbol t - i sits at position t + w - 1 - i of the padded row
        prev = n("Slice", [padded, em.const(f"from{i}", np.array([w - 1 - i], np.int64), "int64"),
                           em.const(f"to{i}", np.array([w - 1 - i + D], np.int64), "int64"), axes], f"back{i}")
        weight = em.const(f"weight{i}", np.array(1 << (tt.bits * i), np.int32), "int32")
        state = n("Add", [state, n("Mul", [prev, weight], f"shift{i}")], f"state{i}")
    table = lut if tt.scale_dtype == em.dtype else n("Cast", [lut], "lut_cast", to=em.onnx_dtype)
    vals = n("Gather", [table, state], "lookup", axis=0)  # (..., D)
    gs = n("Unsqueeze", [n("Gather", [scales, ids], "gather_scales", axis=0), axes], "scale_unsq")
    if tt.scale_dtype != em.dtype:
        gs = n("Cast", [gs], "scales_cast", to=em.onnx_dtype)
    if not len(tt.exact_rows):
        nodes.append(edit.node("Mul", [vals, gs], f"{tag}.qsd.rows", outputs=[node.output[0]]))
        return nodes
    rows = n("Mul", [vals, gs], "rows_coded")
    exact_ids = edit.add_initializer(numpy_helper.from_array(tt.exact_rows.astype(np.int64), f"{em.base}.exact_rows"))
    exact_vals = edit.add_initializer(float_tensor(f"{em.base}.exact_values", tt.exact_values, tt.scale_dtype))
    if tt.scale_dtype != em.dtype:
        exact_vals = n("Cast", [exact_vals], "exact_cast", to=em.onnx_dtype)
    ids64 = n("Cast", [ids], "ids_int64", to=onnx.TensorProto.INT64)
    # Gather counts negative ids from the end: compare row numbers, not ids.
    ids64 = n("Where", [n("Less", [ids64, em.const("zero_id", np.array(0, np.int64), "int64")], "negative_id"),
                        n("Add", [ids64, em.const("rows", np.array(V, np.int64), "int64")], "wrapped_id"), ids64],
              "row_number")
    match = n("Cast", [n("Equal", [n("Unsqueeze", [ids64, axes], "ids_unsq"), exact_ids], "match")],
              "match_float", to=onnx.TensorProto.FLOAT)  # (..., E)
    pos = n("ArgMax", [match], "exact_pos", axis=-1, keepdims=0)  # first match, or 0 when none
    hit = n("Equal", [n("Gather", [exact_ids, pos], "exact_id", axis=0), ids64], "is_exact")
    exact = n("Gather", [exact_vals, pos], "gather_exact", axis=0)  # (..., D)
    nodes.append(edit.node("Where", [n("Unsqueeze", [hit, axes], "is_exact_unsq"), exact, rows],
                           f"{tag}.qsd.rows", outputs=[node.output[0]]))
    return nodes


class LowerQdqPass(Pass):
    """Rewrites every compressed weight's consumers with DequantizeLinear chains.

    Subclasses change how one quantized matrix is multiplied (``emitter``) or how a whole
    MatMul/Gemm is rewritten (``lower_matmul``); Conv and Gather use this portable form in
    every format.
    """

    name = "lower-qdq"
    emitter = QdqEmitter
    # Why a weight read as MatMul's first input is lowered with DequantizeLinear ('' in qdq).
    left_fallback = ""

    def lower_matmul(self, edit: GraphEdit, em: QdqEmitter, node: onnx.NodeProto,
                     rec: WeightRecord) -> list[onnx.NodeProto]:
        return lower_matmul_like(edit, em, node)

    # A pass in three steps, so that a weight can be lowered as soon as it is factorized
    # (``FactorizeWeightsPass(sink=...)``) and its factors dropped, instead of all at the end.
    def begin(self, ctx: Context) -> None:
        self._edit = GraphEdit(ctx.model, ctx.base_dir, spill=ctx.spill)
        self._lowered = 0

    def lower_one(self, ctx: Context, rec: WeightRecord, f) -> None:
        """Rewrites the consumers of one compressed weight."""
        edit = self._edit
        before = edit.new_initializer_bytes()
        em = self.emitter(edit, rec, f)
        consumers = [n for n in ctx.model.graph.node if node_key(n) in rec.nodes]
        if rec.view == "matmul-left" and self.left_fallback:
            rec.extra.setdefault("fallback", []).append(self.left_fallback)
        if rec.view == "tensor":
            lower_tensor(edit, em, rec)
            consumers = consumers[:1]  # the dequantized tensor goes before the first reader
        for node in consumers:
            if rec.view == "tensor":
                new = [node]
            elif rec.view == "matmul-left":
                new = lower_matmul_left(edit, em, node)
            elif rec.op in ("MatMul", "Gemm"):
                new = self.lower_matmul(edit, em, node, rec)
            elif rec.op == "Conv":
                new = lower_conv(edit, em, node, rec)
            elif rec.op in IN_PLACE_OPS:
                new = lower_in_place(edit, em, node, rec)
            else:
                new = lower_gather(edit, em, node, rec)
            # Parts are emitted once, right before the first consumer that needs them.
            edit.replace_node(node, new, prelude=em.prelude)
            em.prelude = []
        rec.bytes_after = edit.new_initializer_bytes() - before - em.other_bytes
        self._lowered += 1

    def finish(self, ctx: Context) -> str:
        self._edit.commit()
        self._edit = None
        return f"{self._lowered} weights lowered ({self.name})"

    def run(self, ctx: Context) -> str:
        self.begin(ctx)
        for name, f in ctx.factorizations.items():
            rec = ctx.record(name)
            if rec.status != "compressed" or f is None:
                continue
            self.lower_one(ctx, rec, f)
            # The factors now live in the graph's tensors; the arrays are dropped.
            ctx.factorizations[name] = None
        return self.finish(ctx)


def planned_opset(ctx: Context) -> Optional[int]:
    """:func:`required_opset` known from the plan alone, before any weight is factorized: when
    every planned weight is block-quantized codes only (rtn, gptq); None otherwise."""
    need = MIN_OPSET
    for rec in ctx.candidates():
        if rec.method not in ("rtn", "gptq") or rec.rank:
            return None
        need = max(need, _opset_for_codes(rec, rec.bits))
    return need
