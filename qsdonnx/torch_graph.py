"""Evaluate an ONNX graph with PyTorch operations, so that gradients flow to its constants.

Only the operators listed in :data:`OPS` are known (those of common transformer and
convolutional exports); :func:`unsupported_ops` names the others, and callers skip what needs
them.  Values are torch tensors; integer tensors (shapes, indices) stay int64.  ``overrides``
replaces initializers by tensors that may require gradients.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from .passes.canonicalize import node_attrs


def _attr(a: dict, name: str, default=None):
    v = a.get(name, default)
    return v.decode() if isinstance(v, bytes) else v


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _axes(node_in: list, a: dict, opset: int, since: int) -> list[int] | None:
    """Axes from the attribute (before opset ``since``) or from the optional second input."""
    if opset < since:
        ax = a.get("axes")
        return list(ax) if ax is not None else None
    return _ints(node_in[1]) if len(node_in) > 1 and node_in[1] is not None else None


def _reduce(fn: Callable, x: torch.Tensor, axes, keep: int, noop_empty: int = 0) -> torch.Tensor:
    if axes is None or len(axes) == 0:
        if noop_empty:
            return x
        axes = list(range(x.dim()))
    return fn(x, dim=[a % x.dim() for a in axes], keepdim=bool(keep))


def _slice(x, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax %= x.dim()
        n = x.shape[ax]
        if st > 0:
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
            x = x.narrow(ax, s, max(0, e - s)) if st == 1 else x.index_select(
                ax, torch.arange(s, e, st, device=x.device))
        else:
            s = max(-1, min(n - 1, s + n if s < 0 else s))
            e = max(-1, min(n - 1, e + n if e < 0 else e))
            idx = torch.arange(s, e, st, device=x.device)
            x = x.index_select(ax, idx)
    return x


def _gather(x, idx, axis):
    axis %= x.dim()
    picked = torch.index_select(x, axis, (idx % x.shape[axis]).reshape(-1))  # negative indices count from the end
    return picked.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def _reshape(x, shape, allowzero=0):
    shape = list(shape)
    if not allowzero:
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _conv(x, w, b, a):
    k = w.dim() - 2
    strides = list(a.get("strides", [1] * k))
    dil = list(a.get("dilations", [1] * k))
    group = int(a.get("group", 1))
    pads = list(a.get("pads", [0] * 2 * k))
    auto = _attr(a, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 2 * k
        for i in range(k):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (w.shape[2 + i] - 1) * dil[i] + 1 - size)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + k] = lo, total - lo
    if any(pads[i] != pads[i + k] for i in range(k)):
        pad = []
        for i in reversed(range(k)):
            pad += [pads[i], pads[i + k]]
        x, padding = F.pad(x, pad), 0
    else:
        padding = pads[:k]
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[k]
    return fn(x, w, b, stride=strides, padding=padding, dilation=dil, groups=group)


def _pool(x, a, kind):
    k = list(a["kernel_shape"])
    strides = list(a.get("strides", [1] * len(k)))
    pads = list(a.get("pads", [0] * 2 * len(k)))  # symmetric (see _setting_problem)
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "avg":
        return F.avg_pool2d(x, k, strides, pads[:len(k)], ceil_mode=ceil,
                            count_include_pad=bool(a.get("count_include_pad", 0)))
    return F.max_pool2d(x, k, strides, pads[:len(k)], ceil_mode=ceil)


def _softmax(x, a, opset, fn):
    axis = int(a.get("axis", -1 if opset >= 13 else 1))
    if opset >= 13:
        return fn(x, dim=axis)
    axis %= x.dim()
    shape = x.shape
    return fn(x.reshape(int(np.prod(shape[:axis], dtype=np.int64)), -1), dim=1).reshape(shape)


def _layernorm(i, a):
    x, w = i[0], i[1]
    b = i[2] if len(i) > 2 else None
    axis = int(a.get("axis", -1)) % x.dim()
    dims = list(range(axis, x.dim()))
    mu = x.mean(dim=dims, keepdim=True)
    var = (x - mu).pow(2).mean(dim=dims, keepdim=True)
    y = (x - mu) / torch.sqrt(var + float(a.get("epsilon", 1e-5))) * w
    return y + b if b is not None else y


def _batchnorm(i, a):
    x, s, b, m, v = i[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - m.reshape(shape)) / torch.sqrt(v.reshape(shape) + float(a.get("epsilon", 1e-5))) * s.reshape(shape) \
        + b.reshape(shape)


def _gemm(i, a):
    A = i[0].T if a.get("transA", 0) else i[0]
    B = i[1].T if a.get("transB", 0) else i[1]
    y = float(a.get("alpha", 1.0)) * (A @ B)
    if len(i) > 2 and i[2] is not None:
        y = y + float(a.get("beta", 1.0)) * i[2]
    return y


_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float32,
           onnx.TensorProto.DOUBLE: torch.float32, onnx.TensorProto.INT64: torch.int64,
           onnx.TensorProto.INT32: torch.int64, onnx.TensorProto.INT8: torch.int64,
           onnx.TensorProto.UINT8: torch.int64, onnx.TensorProto.BOOL: torch.bool}


def _cast(x, a):
    return x.to(_DTYPES[int(a["to"])])  # a type _DTYPES holds (see _setting_problem)


def _clip(i, a, opset):
    x = i[0]
    lo = i[1] if len(i) > 1 and i[1] is not None else (a.get("min") if opset < 11 else None)
    hi = i[2] if len(i) > 2 and i[2] is not None else (a.get("max") if opset < 11 else None)
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return x


def _split(i, a, opset, n_out):
    x = i[0]
    axis = int(a.get("axis", 0))
    split = (_ints(i[1]) if opset >= 13 and len(i) > 1 and i[1] is not None else a.get("split"))
    if split is None:
        size = -(-x.shape[axis] // n_out)
        return list(torch.split(x, size, dim=axis))
    return list(torch.split(x, list(split), dim=axis))


def _binary(fn):
    return lambda i, a, o: fn(i[0], i[1])


def _promote(x, y):
    """ONNX binary operators take one type; Python scalars from shapes are int64 here."""
    if x.dtype != y.dtype and x.is_floating_point() != y.is_floating_point():
        f = x.dtype if x.is_floating_point() else y.dtype
        return x.to(f), y.to(f)
    return x, y


def _div(x, y):
    x, y = _promote(x, y)
    if not x.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


OPS: dict[str, Callable] = {
    "Add": lambda i, a, o: torch.add(*_promote(i[0], i[1])),
    "Sub": lambda i, a, o: torch.sub(*_promote(i[0], i[1])),
    "Mul": lambda i, a, o: torch.mul(*_promote(i[0], i[1])),
    "Div": lambda i, a, o: _div(i[0], i[1]),
    "Pow": lambda i, a, o: torch.pow(i[0], i[1].to(i[0].dtype)),
    "Sqrt": lambda i, a, o: torch.sqrt(i[0]),
    "Exp": lambda i, a, o: torch.exp(i[0]),
    "Log": lambda i, a, o: torch.log(i[0]),
    "Neg": lambda i, a, o: -i[0],
    "Abs": lambda i, a, o: i[0].abs(),
    "Reciprocal": lambda i, a, o: 1.0 / i[0],
    "Erf": lambda i, a, o: torch.erf(i[0]),
    "Tanh": lambda i, a, o: torch.tanh(i[0]),
    "Sigmoid": lambda i, a, o: torch.sigmoid(i[0]),
    "Relu": lambda i, a, o: F.relu(i[0]),
    "LeakyRelu": lambda i, a, o: F.leaky_relu(i[0], float(a.get("alpha", 0.01))),
    "HardSigmoid": lambda i, a, o: torch.clamp(float(a.get("alpha", 0.2)) * i[0] + float(a.get("beta", 0.5)), 0, 1),
    "HardSwish": lambda i, a, o: i[0] * torch.clamp(i[0] / 6 + 0.5, 0, 1),
    "Gelu": lambda i, a, o: F.gelu(i[0], approximate="tanh" if _attr(a, "approximate", "none") == "tanh" else "none"),
    "Identity": lambda i, a, o: i[0],
    "Equal": _binary(torch.eq),
    "Greater": _binary(torch.gt),
    "Less": _binary(torch.lt),
    "Not": lambda i, a, o: ~i[0],
    "Where": lambda i, a, o: torch.where(i[0], *_promote(i[1], i[2])),
    "MatMul": lambda i, a, o: torch.matmul(i[0], i[1]),
    "Gemm": lambda i, a, o: _gemm(i, a),
    "Conv": lambda i, a, o: _conv(i[0], i[1], i[2] if len(i) > 2 else None, a),
    "BatchNormalization": lambda i, a, o: _batchnorm(i, a),
    "LayerNormalization": lambda i, a, o: _layernorm(i, a),
    "Softmax": lambda i, a, o: _softmax(i[0], a, o, torch.softmax),
    "LogSoftmax": lambda i, a, o: _softmax(i[0], a, o, torch.log_softmax),
    "GlobalAveragePool": lambda i, a, o: i[0].mean(dim=list(range(2, i[0].dim())), keepdim=True),
    "AveragePool": lambda i, a, o: _pool(i[0], a, "avg"),
    "MaxPool": lambda i, a, o: _pool(i[0], a, "max"),
    "Shape": lambda i, a, o: torch.tensor(list(i[0].shape), dtype=torch.int64)[
        int(a.get("start", 0)):(a["end"] if "end" in a else None)],
    "Gather": lambda i, a, o: _gather(i[0], i[1], int(a.get("axis", 0))),
    "Unsqueeze": lambda i, a, o: _unsqueeze(i[0], _axes(i, a, o, 13)),
    "Squeeze": lambda i, a, o: _squeeze(i[0], _axes(i, a, o, 13)),
    "Concat": lambda i, a, o: torch.cat(list(_promote_all(i)), dim=int(a["axis"])),
    "Reshape": lambda i, a, o: _reshape(i[0], _ints(i[1]), int(a.get("allowzero", 0))),
    "Flatten": lambda i, a, o: i[0].reshape(int(np.prod(i[0].shape[:int(a.get("axis", 1)) % max(i[0].dim(), 1)],
                                                        dtype=np.int64)), -1),
    "Transpose": lambda i, a, o: i[0].permute(list(a.get("perm", reversed(range(i[0].dim()))))),
    "Expand": lambda i, a, o: i[0].expand(torch.broadcast_shapes(i[0].shape, tuple(_ints(i[1])))),
    "Slice": lambda i, a, o: (_slice(i[0], a["starts"], a["ends"], a.get("axes")) if o < 10 else
                              _slice(i[0], _ints(i[1]), _ints(i[2]),
                                     _ints(i[3]) if len(i) > 3 and i[3] is not None else None,
                                     _ints(i[4]) if len(i) > 4 and i[4] is not None else None)),
    "Cast": lambda i, a, o: _cast(i[0], a),
    "Clip": lambda i, a, o: _clip(i, a, o),
    "ReduceSum": lambda i, a, o: _reduce(torch.sum, i[0], _axes(i, a, o, 13), a.get("keepdims", 1),
                                         a.get("noop_with_empty_axes", 0)),
    "ReduceMean": lambda i, a, o: _reduce(torch.mean, i[0], _axes(i, a, o, 18), a.get("keepdims", 1),
                                          a.get("noop_with_empty_axes", 0)),
    "ReduceMax": lambda i, a, o: _reduce(torch.amax, i[0], _axes(i, a, o, 18), a.get("keepdims", 1),
                                         a.get("noop_with_empty_axes", 0)),
    "ReduceL2": lambda i, a, o: _reduce(lambda x, dim, keepdim: torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim),
                                        i[0], _axes(i, a, o, 18), a.get("keepdims", 1),
                                        a.get("noop_with_empty_axes", 0)),
    "ConstantOfShape": lambda i, a, o: torch.full(_ints(i[0]), _const_value(a), dtype=torch.float32),
    "Range": lambda i, a, o: torch.arange(i[0].item(), i[1].item(), i[2].item()),
}
MULTI_OUTPUT_OPS = {"Split": _split}


def _const_value(a):
    v = a.get("value")
    return float(numpy_helper.to_array(v).reshape(-1)[0]) if v is not None else 0.0


def _promote_all(ts):
    if any(t.is_floating_point() for t in ts):
        return [t.float() for t in ts]
    return ts


def _unsqueeze(x, axes):
    out_rank = x.dim() + len(axes)
    for ax in sorted(a % out_rank for a in axes):
        x = x.unsqueeze(ax)
    return x


def _squeeze(x, axes):
    if axes is None:
        return x.squeeze()
    for ax in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype.kind == "f":
        return torch.from_numpy(np.array(arr, dtype=np.float32))
    if arr.dtype == np.bool_:
        return torch.from_numpy(np.array(arr))
    return torch.from_numpy(np.array(arr, dtype=np.int64))


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _setting_problem(node: onnx.NodeProto, a: dict) -> str | None:
    """What :class:`TorchGraph` cannot evaluate about ``node``: its operator, or a setting of a
    known operator; None when it can."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in set(OPS) | set(MULTI_OUTPUT_OPS) | {"Constant"}:
        return node.op_type
    if node.op_type == "Constant" and "value" not in a:
        return "Constant without a tensor value"
    if node.op_type == "Cast" and int(a["to"]) not in _DTYPES:
        return f"Cast to type {int(a['to'])}"
    if node.op_type in ("AveragePool", "MaxPool"):
        k = len(a.get("kernel_shape", []))
        pads = list(a.get("pads", [0] * 2 * k))
        if _attr(a, "auto_pad", "NOTSET") != "NOTSET" or any(pads[i] != pads[i + k] for i in range(k)):
            return f"{node.op_type} with asymmetric or automatic pads"
    return None


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """The operators (or operator settings) of the main graph that :class:`TorchGraph` cannot
    evaluate; every other node is evaluated."""
    return sorted({p for n in model.graph.node if (p := _setting_problem(n, node_attrs(n))) is not None})


class TorchGraph:
    """The main graph of ``model`` as a function of its inputs (float inputs become float32)."""

    def __init__(self, model: onnx.ModelProto):
        missing = unsupported_ops(model)
        if missing:
            raise NotImplementedError(f"operators without a torch evaluation: {', '.join(missing)}")
        self.model = model
        self.opset = opset_of(model)
        self.consts = {t.name: _to_torch(numpy_helper.to_array(t)) for t in model.graph.initializer}
        self.nodes = [(n, node_attrs(n)) for n in model.graph.node]
        for n, a in self.nodes:
            if n.op_type == "Constant":
                self.consts[n.output[0]] = _to_torch(numpy_helper.to_array(a["value"]))
        self.outputs = [o.name for o in model.graph.output]

    def __call__(self, feeds: Mapping[str, np.ndarray | torch.Tensor],
                 overrides: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(self.consts)
        if overrides:
            env.update(overrides)
        for k, v in feeds.items():
            env[k] = v if isinstance(v, torch.Tensor) else _to_torch(np.asarray(v))
        for n, a in self.nodes:
            if n.op_type == "Constant":
                continue
            ins = [env[x] if x else None for x in n.input]
            if n.op_type in MULTI_OUTPUT_OPS:
                for name, v in zip(n.output, MULTI_OUTPUT_OPS[n.op_type](ins, a, self.opset, len(n.output))):
                    env[name] = v
            else:
                env[n.output[0]] = OPS[n.op_type](ins, a, self.opset)
        return [env[o] for o in self.outputs]


