"""Pure-math factorizations of weight matrices (numpy in, numpy out; torch inside; no onnx)."""
from .budget import (caldera_nbytes, lowrank_nbytes, qsd_nbytes, quantized_nbytes,
                     rank_for_budget, rtn_nbytes, sparse_factor_nbytes)
from .caldera import caldera_factorize
from .gptq import gptq_factorize, gptq_quantize
from .lplr import lplr_factorize
from .packing import dequantize_matmulnbits, pack_bits, to_matmulnbits, unpack_bits
from .planner import Candidate, plan_allocation, predict_error, predict_relative_error
from .qsd import qsd_factorize
from .quantizers import quantize_matrix
from .rtn import rtn_factorize, rtn_quantize
from .svd import svd_factorize, weighted_svd, weighted_svd_factorize
from .types import (DenseMatrix, Factorization, QuantizedMatrix, SparseMatrix,
                    SparseQuantizedMatrix)

__all__ = [
    "Candidate", "DenseMatrix", "Factorization", "QuantizedMatrix", "SparseMatrix",
    "SparseQuantizedMatrix", "caldera_factorize", "caldera_nbytes", "dequantize_matmulnbits",
    "gptq_factorize", "gptq_quantize", "lowrank_nbytes", "lplr_factorize", "pack_bits",
    "plan_allocation", "predict_error", "predict_relative_error", "qsd_factorize", "qsd_nbytes",
    "quantize_matrix", "quantized_nbytes", "rank_for_budget", "rtn_factorize", "rtn_nbytes",
    "rtn_quantize", "sparse_factor_nbytes", "svd_factorize", "to_matmulnbits", "unpack_bits",
    "weighted_svd", "weighted_svd_factorize",
]
