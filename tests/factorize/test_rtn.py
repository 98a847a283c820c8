import numpy as np
import pytest

from qsdonnx.factorize.quantizers import code_range
from qsdonnx.factorize.rtn import rtn_factorize, rtn_quantize


def _scale_per_element(qm):
    K = qm.shape[0]
    return np.repeat(qm.stored_scales(), qm.block_size, axis=0)[:K]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("K,bs", [(64, 32), (100, 32), (48, 16), (20, 128)])
def test_rtn_error_bounded_by_half_step(bits, symmetric, K, bs):
    rng = np.random.default_rng(bits * 7 + K)
    W = (rng.standard_normal((K, 9)) * rng.uniform(0.01, 3, size=9)).astype(np.float32)
    qm = rtn_quantize(W, bits, bs, symmetric=symmetric, clip_search=False)
    qmin, qmax = code_range(bits, symmetric)
    assert qm.codes.min() >= qmin and qm.codes.max() <= qmax
    assert qm.codes.dtype == (np.int8 if symmetric else np.uint8)
    assert qm.scales.shape == ((K + bs - 1) // bs, 9)
    err = np.abs(W - qm.dequantize())
    assert np.all(err <= _scale_per_element(qm) * (0.5 + 1e-5) + 1e-12)


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_exact_on_grid(symmetric):
    rng = np.random.default_rng(1)
    bits, bs = 4, 32
    qmin, qmax = code_range(bits, symmetric)
    codes = rng.integers(qmin, qmax + 1, size=(64, 5))
    codes[0] = qmin  # pin the block extremes so the min/max grid is the one used to build W
    codes[1] = qmax
    codes[32] = qmin
    codes[33] = qmax
    if not symmetric:
        z = 5
        codes[2] = z  # zero is on the grid
        codes[34] = z
        W = ((codes - z) * 0.125).astype(np.float32)
    else:
        W = (codes * 0.125).astype(np.float32)
    qm = rtn_quantize(W, bits, bs, symmetric=symmetric, clip_search=False)
    np.testing.assert_array_equal(qm.dequantize(), W)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_worse_per_block_and_better_on_heavy_tails(bits, symmetric):
    rng = np.random.default_rng(bits)
    W = rng.standard_t(df=3, size=(256, 40)).astype(np.float32)  # heavy tails: clipping pays
    plain = rtn_quantize(W, bits, 32, symmetric=symmetric, clip_search=False)
    clipped = rtn_quantize(W, bits, 32, symmetric=symmetric)
    e_plain = ((plain.dequantize() - W) ** 2).reshape(8, 32, 40).sum(axis=1)
    e_clip = ((clipped.dequantize() - W) ** 2).reshape(8, 32, 40).sum(axis=1)
    assert np.all(e_clip <= e_plain * (1 + 1e-6) + 1e-12)
    if bits <= 4:
        assert e_clip.sum() < (0.97 if bits <= 3 else 0.99) * e_plain.sum()


def test_rtn_bpw_4bit_block32_fp16():
    W = np.random.default_rng(0).standard_normal((128, 48)).astype(np.float32)
    f = rtn_factorize(W, 4, 32)
    assert f.method == "rtn"
    assert f.bits_per_weight() == 4.5
    assert rtn_factorize(W, 4, 32, scale_dtype="float32").bits_per_weight() == 5.0
    assert rtn_factorize(W, 8, 32).bits_per_weight() == 8.5
    assert rtn_factorize(W, 2, 32).bits_per_weight() == 2.5
    assert rtn_factorize(W, 3, 32).bits_per_weight() == 3.5
    # Asymmetric adds a packed zero point per block.
    assert rtn_factorize(W, 4, 32, symmetric=False).bits_per_weight() == 4.625


def test_rtn_all_zero_block():
    W = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    W[:32, 1] = 0.0
    for symmetric in (True, False):
        qm = rtn_quantize(W, 4, 32, symmetric=symmetric)
        assert np.all(np.isfinite(qm.scales)) and np.all(qm.scales > 0)
        np.testing.assert_array_equal(qm.dequantize()[:32, 1], 0.0)


def test_rtn_uses_stored_scale():
    # Extremes chosen so that the fp16-rounded scale would clip them if it were rounded down.
    W = np.array([[0.1], [-0.7000001], [0.33333]], np.float32)
    qm = rtn_quantize(W, 4, 32)
    s = qm.stored_scales()[0, 0]
    assert np.all(np.abs(W - qm.dequantize()) <= s * 0.5 + 1e-7)
    assert qm.scales[0, 0] == s  # the scale already is the stored value


def test_rtn_2bit_uses_the_negative_code():
    W = np.array([[-1.0], [0.5], [0.0], [-0.5]], np.float32)
    qm = rtn_quantize(W, 2, 4)
    assert qm.scales[0, 0] == 0.5
    assert qm.codes.ravel().tolist() == [-2, 1, 0, -1]


def _clip_search_reference(W, bits, bs, symmetric):
    """Per block, the shrink factor of CLIP_FACTORS whose min/max grid (numpy's
    scales_from_range) has the least squared error; the first of equals."""
    from qsdonnx.factorize.quantizers import CLIP_FACTORS, block_view, scales_from_range

    Wb = block_view(W, bs).astype(np.float64)
    lo, hi = Wb.min(axis=1), Wb.max(axis=1)
    qmin, qmax = code_range(bits, symmetric)
    best_err = best_s = best_z = None
    for f in CLIP_FACTORS:
        s, z = scales_from_range(lo * f, hi * f, bits, symmetric, "float16")
        zz = 0 if z is None else z.astype(np.float64)[:, None, :]
        c = np.clip(np.round(Wb.astype(np.float32) / s[:, None, :]) + zz, qmin, qmax)
        err = (((c - zz) * s[:, None, :] - Wb) ** 2).sum(axis=1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
            continue
        better = err < best_err - 1e-12 * np.abs(best_err)
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_z = None if z is None else np.where(better, z, best_z)
    return best_s, best_z


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4])
def test_clip_search_picks_the_least_squared_error_grid_of_each_block(bits, symmetric):
    rng = np.random.default_rng(bits)
    W = (rng.standard_normal((96, 40)) * rng.gamma(1.0, 1.0, (96, 1))).astype(np.float32)
    W[5] *= 30  # outliers make clipping pay in some blocks, not in others
    s_ref, z_ref = _clip_search_reference(W, bits, 32, symmetric)
    qm = rtn_quantize(W, bits, 32, symmetric=symmetric)
    assert (s_ref != s_ref.max()).any()  # the factors differ between blocks
    np.testing.assert_array_equal(qm.scales, s_ref)
    if not symmetric:
        np.testing.assert_array_equal(qm.zero_points, z_ref)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("K", [96, 100])
def test_rtn_read_a_few_rows_at_a_time_gives_the_same_codes_and_its_error(monkeypatch, K, symmetric):
    """A matrix read in pieces of a few blocks of rows (the last one partial when K is not a
    multiple of the block) is quantized exactly as the whole matrix, and the error measured
    piece by piece is the whole matrix's."""
    from qsdonnx.factorize import rtn

    W = np.random.default_rng(K).standard_normal((K, 24)).astype(np.float32)
    whole = rtn_quantize(W, 3, 16, symmetric=symmetric)
    reads = []

    def read(a, b):
        reads.append((a, b))
        return W[a:b]

    monkeypatch.setattr(rtn, "ROWS_ELEMENTS", 32 * 24)  # two blocks of 16 rows per read
    f, rel = rtn.rtn_factorize_rows(read, W.shape, 3, 16, symmetric=symmetric)
    assert reads[0] == (0, 32) and len(reads) == -(-K // 32) and reads[-1][1] == K
    np.testing.assert_array_equal(f.q.codes, whole.codes)
    np.testing.assert_array_equal(f.q.scales, whole.scales)
    d = W - whole.dequantize()
    assert rel == pytest.approx(np.linalg.norm(d) / np.linalg.norm(W), rel=1e-5)
