import numpy as np
import pytest

from qsdonnx.factorize.packing import (dequantize_matmulnbits, pack_bits, pack_stream, to_matmulnbits,
                                       unpack_bits, unpack_stream)
from qsdonnx.factorize.rtn import rtn_quantize


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 33])
def test_pack_unpack_roundtrip(bits, n):
    rng = np.random.default_rng(bits * 100 + n)
    v = rng.integers(0, 1 << bits, size=(3, 5, n), dtype=np.uint8)
    p = pack_bits(v, bits)
    assert p.dtype == np.uint8
    assert p.shape == (3, 5, (n * bits + 7) // 8)
    np.testing.assert_array_equal(unpack_bits(p, bits, n), v)


def test_pack_low_bits_first():
    assert pack_bits(np.array([1, 2], np.uint8), 4).tolist() == [0x21]
    assert pack_bits(np.array([1, 2, 3, 0], np.uint8), 2).tolist() == [0b00111001]
    assert pack_bits(np.array([3, 1, 2], np.uint8), 2).tolist() == [0b00100111]
    assert pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 1, 1], np.uint8), 1).tolist() == [0x81, 0x01]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_bits(np.array([16], np.uint8), 4)
    with pytest.raises(ValueError):
        pack_bits(np.array([1], np.uint8), 3)


@pytest.mark.parametrize("bits", [1, 3, 5, 7, 8])
@pytest.mark.parametrize("n", [1, 8, 17, 64])
def test_stream_roundtrip_and_size(bits, n):
    rng = np.random.default_rng(bits * 10 + n)
    v = rng.integers(0, 1 << bits, size=(2, n), dtype=np.uint8)
    p = pack_stream(v, bits)
    assert p.dtype == np.uint8 and p.shape == (-(-2 * n // 8), bits)  # exactly `bits` bytes per 8 codes
    np.testing.assert_array_equal(unpack_stream(p, bits, 2 * n), v.ravel())


def test_stream_layout_low_bits_first():
    # codes 0..7 at 3 bits: 0b111_110_101_100_011_010_001_000 = 0xFAC688, little-endian bytes
    assert pack_stream(np.arange(8, dtype=np.uint8), 3).tolist() == [[0x88, 0xC6, 0xFA]]
    assert pack_stream(np.array([5], np.uint8), 3).tolist() == [[5, 0, 0]]  # padded with zero codes
    with pytest.raises(ValueError):
        pack_stream(np.array([8], np.uint8), 3)


@pytest.mark.parametrize("bits,container", [(2, 2), (3, 4), (4, 4), (8, 8), (4, 8)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("K", [64, 70])
def test_matmulnbits_roundtrip(bits, container, symmetric, K):
    rng = np.random.default_rng(K + bits)
    N, bs = 12, 32
    W = rng.standard_normal((K, N)).astype(np.float32)
    qm = rtn_quantize(W, bits, bs, symmetric=symmetric)
    B, scales, zp = to_matmulnbits(qm, bits=container)
    kb = (K + bs - 1) // bs
    assert B.dtype == np.uint8 and B.shape == (N, kb, bs * container // 8)
    assert scales.dtype == np.float32 and scales.shape == (N * kb,)
    assert zp.dtype == np.uint8 and zp.shape == (N, (kb * container + 7) // 8)
    np.testing.assert_array_equal(scales.reshape(N, kb), qm.stored_scales().T)
    back = dequantize_matmulnbits(B, scales, zp, K, container, bs)
    np.testing.assert_array_equal(back, qm.dequantize())
    # The padded tail of K decodes to exactly zero.
    u = unpack_bits(B, container, bs).reshape(N, kb * bs).astype(np.int32)
    z = unpack_bits(zp, container, kb).astype(np.int32)
    np.testing.assert_array_equal(u[:, K:], np.repeat(z, bs, axis=1)[:, K:])


def test_matmulnbits_default_container_and_symmetric_zero_point():
    W = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
    qm = rtn_quantize(W, 3, 32)
    B, _, zp = to_matmulnbits(qm)
    assert B.shape == (4, 1, 16)
    assert unpack_bits(zp, 4, 1).ravel().tolist() == [8, 8, 8, 8]
    # Without zero points the runtime assumes 2^(bits-1): same decoding.
    np.testing.assert_array_equal(dequantize_matmulnbits(B, _, None, 32, 4, 32), qm.dequantize())


def test_matmulnbits_rejects_bad_block():
    qm = rtn_quantize(np.ones((24, 2), np.float32), 4, 24)
    with pytest.raises(ValueError):
        to_matmulnbits(qm)
    qm = rtn_quantize(np.ones((32, 2), np.float32), 4, 32)
    with pytest.raises(ValueError):
        to_matmulnbits(qm, bits=2)
