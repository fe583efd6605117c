"""utils/quant.py: block-scaled FP8 and MXFP4, against transformers' own dequantisation code.

References (transformers 5, pure torch, CPU):
- FP8: integrations.finegrained_fp8._dequantize_fp8_weight (partial edge blocks handled: it is given
  the block size) and Fp8Dequantize._dequantize_one, the op transformers runs when it loads an FP8
  checkpoint dequantised (on a machine without a recent GPU). The latter infers the block size as
  rows // scale_rows, so it is only a reference for weights made of whole blocks.
- MXFP4: integrations.mxfp4.convert_moe_packed_tensors, which dequantises gpt-oss's experts (and
  hands them back transposed to gpt-oss's (E, in, out) layout), and Fp8Dequantize's FP4 path
  (packed e2m1 nibbles with uint8 e8m0 scales).
Random bytes stand for the packed data, so every code and scale occurs; equality is bit for bit.
One exception, on purpose: the e8m0 scale byte 255. The OCP MX specification makes it NaN, and so
does dequantize_mxfp4; transformers does not treat it specially, and its versions differ on it
(5.25's convert_moe_packed_tensors reads it as 2^128: 0.5 x 2^128 stays finite, larger values
overflow to inf; 5.20's gives inf or NaN). Published checkpoints never hold it, so the comparisons
use scales 0-254 and test_mxfp4_codes_scales_and_ties checks our NaN.
On transformers older than 5.25 (the declared floor, 5.20) the FP8 reference that is given the block
size does not exist: there, the partial-edge-block cases are skipped and whole blocks are compared
with Fp8Dequantize alone.
"""
import pytest
import torch
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from utils.memory import bits_per_weight
from utils.quant import (E2M1_VALUES, FP8_MAX, check_block, dequantize_fp8_blockwise, dequantize_mxfp4,
                         fp8_error_bound, mx_exponents, mxfp4_error_bound, quantize_fp8_blockwise, quantize_mxfp4,
                         quantized_bytes)

try:                    # newer transformers (5.25): the reference that is given the block size
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
except ImportError:     # older ones (5.20, the declared floor) have only the load-time op: whole blocks
    _dequantize_fp8_weight = None

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(t):
    """The bit patterns of a float tensor (tells -0.0 from 0.0; equal infinities compare equal)."""
    return t.contiguous().view(BITS[t.dtype])


def random_fp8(shape, seed):
    """Random float8_e4m3fn numbers: every byte but the two NaN codes (0x7F, 0xFF)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    raw = torch.where((raw & 0x7F) == 0x7F, raw - 1, raw)
    return raw.view(torch.float8_e4m3fn)


def random_scales(shape, seed):
    """Positive float32 scales over many orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(shape).uniform_(-20, 5, generator=g)).float()


def weights(shape, seed, dtype=torch.float32):
    """Weights whose size varies by orders of magnitude between rows and columns (so blocks differ)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.exp(torch.empty(*shape[:-1], 1).uniform_(-6, 3, generator=g))
    cols = torch.exp(torch.empty(shape[-1]).uniform_(-2, 2, generator=g))
    return (torch.randn(shape, generator=g) * rows * cols).to(dtype)


# Shapes (..., M, N) and blocks: whole blocks, partial edge blocks, a stack of experts, one block only.
FP8_CASES = [((256, 384), (128, 128)), ((200, 300), (128, 128)), ((3, 130, 257), (128, 128)),
             ((2, 5, 40, 24), (16, 8)), ((7, 9), (128, 128)), ((64, 96), (32, 64))]


@pytest.mark.parametrize("shape,block", FP8_CASES)
def test_fp8_dequantisation_equals_transformers_bit_for_bit(shape, block):
    w_fp8 = random_fp8(shape, seed=1)
    grid = (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    scale_inv = random_scales((*shape[:-2], *grid), seed=2)
    ours = dequantize_fp8_blockwise(w_fp8, scale_inv, block)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    whole_blocks = shape[-2] % block[0] == 0 and shape[-1] % block[1] == 0
    if _dequantize_fp8_weight is None and not whole_blocks:
        pytest.skip("this transformers has no reference for partial edge blocks (_dequantize_fp8_weight)")
    if _dequantize_fp8_weight is not None:
        reference = _dequantize_fp8_weight(w_fp8, scale_inv, list(block), torch.float32)
        assert torch.equal(bits(ours), bits(reference))
    if whole_blocks:                                                  # the load-time op needs whole blocks
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            loaded = Fp8Dequantize(None)._dequantize_one(w_fp8, scale_inv, output_dtype=dtype)
            assert torch.equal(bits(dequantize_fp8_blockwise(w_fp8, scale_inv, block, dtype)), bits(loaded))


def test_fp8_block_size_matters_on_partial_edges():
    """With partial edge blocks the shapes do not give the block size: 200 rows with 2 rows of scales
    may be blocks of 128 (+ 72) or of 100. Read as blocks of 100, the same bytes give other weights."""
    w_fp8, scale_inv = random_fp8((200, 300), seed=3), random_scales((2, 3), seed=4)
    assert not torch.equal(dequantize_fp8_blockwise(w_fp8, scale_inv, (128, 128)),
                           dequantize_fp8_blockwise(w_fp8, scale_inv, (100, 100)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,block", FP8_CASES)
def test_fp8_round_trip_stays_within_the_stated_bound(shape, block, dtype):
    w = weights(shape, seed=5, dtype=dtype)
    w_fp8, scale_inv = quantize_fp8_blockwise(w, block)
    assert w_fp8.dtype == torch.float8_e4m3fn and w_fp8.shape == w.shape
    assert scale_inv.dtype == torch.float32
    assert scale_inv.shape == (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    back = dequantize_fp8_blockwise(w_fp8, scale_inv, block)
    error, bound = (back - w.float()).abs(), fp8_error_bound(w, scale_inv, block)
    assert (error <= bound).all()
    if w.numel() > 1000:
        assert (error / bound).max() > 0.8                     # the bound is nearly reached: it is not loose
        assert (error / w.float().abs().clamp_min(1e-30)).median() < 1 / 32    # typical error well below 1/16
    # Every block's largest |w| becomes exactly +-448
    M, N = shape[-2:]
    padded = torch.zeros(*shape[:-2], scale_inv.shape[-2] * block[0], scale_inv.shape[-1] * block[1])
    padded[..., :M, :N] = w_fp8.float().abs()
    tile_max = padded.unflatten(-1, (-1, block[1])).unflatten(-3, (-1, block[0])).amax(dim=(-3, -1))
    assert torch.equal(tile_max, torch.full_like(tile_max, FP8_MAX))


def test_fp8_zero_blocks_and_exact_values():
    w = torch.zeros(4, 256)
    w[:, 128:] = torch.tensor([1.0, -2.0, 0.5, 448.0]).repeat(32)          # e4m3 numbers, largest 448
    w_fp8, scale_inv = quantize_fp8_blockwise(w)
    assert scale_inv.tolist() == [[1.0, 1.0]]                               # zero block: scale 1
    assert torch.equal(dequantize_fp8_blockwise(w_fp8, scale_inv), w)     # representable values: exact


def test_fp8_dequantisation_of_a_non_contiguous_tensor():
    """The scales are broadcast over views of the blocks: a transposed (non-contiguous) FP8 tensor
    gives what its contiguous copy gives."""
    w_fp8, scale_inv = random_fp8((300, 200), seed=12), random_scales((2, 3), seed=13)
    transposed = w_fp8.t()                                                 # (200, 300), not contiguous
    assert not transposed.is_contiguous()
    assert torch.equal(dequantize_fp8_blockwise(transposed, scale_inv, (100, 128)),
                       dequantize_fp8_blockwise(transposed.contiguous(), scale_inv, (100, 128)))


def test_fp8_tiny_blocks_get_a_normal_scale_not_nan():
    """A block whose largest |w| is below 448 x 2^-126 would get a scale_inv that is a float32
    subnormal, or 0 (and then 0 / 0 = NaN): it gets 2^-126 instead, and stays within the bound."""
    tiny = torch.finfo(torch.float32).tiny
    w = torch.full((4, 64), 0.5)
    w[:, 16:32], w[:, 32:48] = 1e-42, 1e-38           # a float32 subnormal; a normal number under 448 x 2^-126
    w[:, 48:] = 0
    w[0, 48:] = torch.linspace(-3e-40, 3e-40, 16)                  # and a block of subnormals and zeros
    w_fp8, scale_inv = quantize_fp8_blockwise(w, (4, 16))
    assert scale_inv[0, 0] == 0.5 / FP8_MAX and scale_inv[0, 1:].tolist() == [tiny] * 3
    back = dequantize_fp8_blockwise(w_fp8, scale_inv, (4, 16))
    assert torch.isfinite(back).all()
    assert ((back - w).abs() <= fp8_error_bound(w, scale_inv, (4, 16))).all()
    assert (back[:, 32:48] > 0).all()                  # 1e-38 / 2^-126 is about 0.85: representable, not 0


def test_float64_weights_beyond_float32_range_are_refused():
    w = torch.ones(4, 64, dtype=torch.float64)
    assert torch.equal(dequantize_fp8_blockwise(*quantize_fp8_blockwise(w)), w.float())      # in range: fine
    w[1, 3] = -1e39                                                       # not a float32 number
    for quantize in (quantize_fp8_blockwise, quantize_mxfp4):
        with pytest.raises(ValueError, match=r"w must hold values within float32's range \(\|w\| <= 3\.403e\+38\)"):
            quantize(w)


def test_check_block():
    assert check_block([64, 32]) == (64, 32) and check_block(None, allow_none=True) is None
    for bad in (None, (128,), (0, 128), (128.0, 128), (True, 128), "128"):
        with pytest.raises(ValueError, match=r"^block must be two positive ints \(rows, cols\), e.g. \(128, 128\)"):
            check_block(bad)
    with pytest.raises(ValueError, match=r"^fp8_block_size must be None or two positive ints"):
        check_block(128, name="fp8_block_size", allow_none=True)


def test_error_bounds_refuse_bad_inputs():
    w = weights((64, 96), seed=14)
    _, scale_inv = quantize_fp8_blockwise(w, (32, 32))
    _, scales = quantize_mxfp4(w)
    assert fp8_error_bound(w, scale_inv, (32, 32)).shape == mxfp4_error_bound(w, scales).shape == w.shape
    with pytest.raises(ValueError, match=r"scale_inv must be a float tensor of shape \(1, 1\)"):
        fp8_error_bound(w, scale_inv)                                     # blocks of 128: another grid
    with pytest.raises(ValueError, match="scale_inv must be a float tensor"):
        fp8_error_bound(w, scale_inv.int(), (32, 32))
    with pytest.raises(ValueError, match="w must be a float tensor"):
        fp8_error_bound(w.int(), scale_inv, (32, 32))
    with pytest.raises(ValueError, match="block must be two positive ints"):
        fp8_error_bound(w, scale_inv, (32,))
    with pytest.raises(ValueError, match=r"scales must be a torch.uint8 tensor of shape \(64, 3\)"):
        mxfp4_error_bound(w, scales[:, :2])
    with pytest.raises(ValueError, match=r"scales must be a torch.uint8 tensor"):
        mxfp4_error_bound(w, scales.float())
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4_error_bound(w[:, :40], scales)
    with pytest.raises(ValueError, match="w must hold finite values only"):
        mxfp4_error_bound(w * float("inf"), scales)


def test_fp8_bad_inputs_raise_value_errors():
    w = torch.randn(64, 64)
    for bad, match in ((torch.ones(4, 4, dtype=torch.int32), "w must be a float tensor"),
                       (torch.randn(64), "at least 2 dimensions"),
                       (torch.tensor([[1.0, float("inf")]]), "finite values only")):
        with pytest.raises(ValueError, match=match):
            quantize_fp8_blockwise(bad)
    for block in ((128,), (0, 128), (128.0, 128), "128"):
        with pytest.raises(ValueError, match="block must be two positive ints"):
            quantize_fp8_blockwise(w, block)
    w_fp8, scale_inv = quantize_fp8_blockwise(w, (32, 32))
    with pytest.raises(ValueError, match=r"scale_inv has shape \(2, 2\); a weight of shape \(64, 64\) in blocks of "
                                         r"\(128, 128\) needs \(1, 1\)"):
        dequantize_fp8_blockwise(w_fp8, scale_inv)
    with pytest.raises(ValueError, match="w_fp8 must be a torch.float8_e4m3fn tensor"):
        dequantize_fp8_blockwise(w, scale_inv, (32, 32))
    with pytest.raises(ValueError, match="scale_inv must be a float tensor"):
        dequantize_fp8_blockwise(w_fp8, scale_inv.int(), (32, 32))


# ----------------------------------------------------------------------------------------------
# MXFP4

def random_mxfp4(shape, seed, max_scale=254):
    """Random packed MXFP4: blocks (..., G, 16) of random bytes, scales (..., G) in [0, max_scale].
    Never 255, e8m0's NaN, which transformers reads differently on purpose (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, max_scale + 1, shape, dtype=torch.uint8, generator=g)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 64, 3), (2, 96, 16), (1, 7, 1)])
def test_mxfp4_dequantisation_equals_convert_moe_packed_tensors_bit_for_bit(shape, dtype):
    """(E, N, G) blocks of every code and every finite scale, 2^-127 to 2^127: transformers returns
    (E, 32 G, N), gpt-oss's (in, out) layout, ours (E, N, 32 G), the (out, in) layout of nn.Linear."""
    blocks, scales = random_mxfp4(shape, seed=6)
    ours = dequantize_mxfp4(blocks, scales, dtype)
    reference = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.shape == (*shape[:2], 32 * shape[2]) and ours.dtype == dtype
    assert torch.equal(bits(ours.transpose(1, 2)), bits(reference))


def test_mxfp4_dequantisation_equals_transformers_fp4_unpacking():
    """transformers' FP8 loader also unpacks FP4 experts (two e2m1 nibbles per int8 byte) with uint8
    e8m0 scales, one per 32 values of a row: a second, independent reference."""
    blocks, scales = random_mxfp4((48, 5), seed=7, max_scale=200)
    packed = blocks.flatten(-2).view(torch.int8)                           # (48, 80): two values per byte
    reference = Fp8Dequantize(None)._dequantize_one(packed, scales, output_dtype=torch.float32)
    assert torch.equal(bits(dequantize_mxfp4(blocks, scales, torch.float32)), bits(reference))


def test_mxfp4_codes_scales_and_ties():
    table = torch.tensor(E2M1_VALUES)
    blocks = torch.arange(16, dtype=torch.uint8).repeat(2)                 # every code, in two bytes per pair
    blocks = (blocks[0::2] | (blocks[1::2] << 4))[None]                    # one block (1, 16): codes 0..15 twice
    values = dequantize_mxfp4(blocks, torch.tensor([127], dtype=torch.uint8), torch.float32)
    assert values.shape == (32,) and torch.equal(values, table.repeat(2))  # low nibble first, scale 2^0
    assert dequantize_mxfp4(blocks, torch.tensor([130], dtype=torch.uint8), torch.float32)[7] == 6 * 8
    assert torch.isnan(dequantize_mxfp4(blocks, torch.tensor([255], dtype=torch.uint8))).all()   # e8m0 NaN (OCP)
    # (transformers' versions differ on byte 255 - finite, inf or NaN - which is why the comparisons exclude it)
    # Midpoints round to the even code: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4)[None]
    blocks, scales = quantize_mxfp4(-x)
    assert scales.tolist() == [[127]]
    assert dequantize_mxfp4(blocks, scales, torch.float32)[0, :8].tolist() == [-0.0, -1, -1, -2, -2, -4, -4, -6]


def test_mxfp4_scale_is_the_smallest_that_clips_nothing():
    amax = torch.tensor([6.0, 6.0001, 5.99, 3.0, 3.01, 1e-3, 1e30, 0.75, 0.7501])
    e = mx_exponents(amax).double()
    assert (6 * 2 ** e >= amax.double()).all() and (6 * 2 ** (e - 1) < amax.double()).all()
    assert mx_exponents(torch.tensor([0.0, 1e-45])).tolist() == [-127, -127]    # zero, and below e8m0's range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_round_trip_stays_within_the_stated_bound(dtype):
    w = weights((3, 40, 128), seed=8, dtype=dtype)
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 40, 4, 16) and scales.shape == (3, 40, 4)
    back = dequantize_mxfp4(blocks, scales, torch.float32)
    error, bound = (back - w.float()).abs(), mxfp4_error_bound(w, scales)
    assert (error <= bound).all() and (error / bound).max() > 0.99          # reached: 0.25 rounds to 0
    amax = w.float().abs().unflatten(-1, (4, 32)).amax(-1).repeat_interleave(32, -1)
    assert (error <= torch.maximum(w.float().abs() / 4, amax / 12)).all()    # the bound in the block's terms
    # Weights that are e2m1 numbers times a power of two, with a largest |w| of 6 times it, come back exactly
    codes = torch.randint(0, 16, (2, 64), generator=torch.Generator().manual_seed(9))
    exact = torch.tensor(E2M1_VALUES)[codes] * 2.0 ** torch.tensor([[-3.0], [5.0]])
    exact[:, 0], exact[:, 32] = 6 * 2.0 ** torch.tensor([-3.0, 5.0]), -6 * 2.0 ** torch.tensor([-3.0, 5.0])
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(exact), torch.float32), exact)


def test_mxfp4_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.randn(4, 40))
    with pytest.raises(ValueError, match="w must be a float tensor"):
        quantize_mxfp4(torch.ones(4, 32, dtype=torch.int64))
    blocks, scales = quantize_mxfp4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="blocks must be a torch.uint8 tensor"):
        dequantize_mxfp4(blocks.int(), scales)
    with pytest.raises(ValueError, match="scales must be a torch.uint8 tensor"):
        dequantize_mxfp4(blocks, scales.float())
    with pytest.raises(ValueError, match=r"blocks must be \(..., G, 16\) and scales \(..., G\)"):
        dequantize_mxfp4(blocks, scales[:, :1])
    with pytest.raises(ValueError, match=r"blocks must be \(..., G, 16\)"):
        dequantize_mxfp4(blocks[..., :8], scales)


def test_quantized_bytes_are_the_tensors_bytes_and_memory_formats():
    for shape, block in FP8_CASES:
        w_fp8, scale_inv = quantize_fp8_blockwise(weights(shape, seed=10), block)
        assert quantized_bytes(shape, "fp8", block) == w_fp8.nbytes + scale_inv.nbytes
    blocks, scales = quantize_mxfp4(weights((3, 40, 128), seed=11))
    assert quantized_bytes((3, 40, 128), "mxfp4") == blocks.nbytes + scales.nbytes
    # utils.memory's bits per weight are these formats' (FP8 for whole 128 x 128 blocks)
    n = 512 * 1024
    assert quantized_bytes((512, 1024), "fp8") * 8 / n == bits_per_weight("fp8", "routed_experts")
    assert quantized_bytes((512, 1024), "mxfp4") * 8 / n == bits_per_weight("mxfp4", "routed_experts")
    with pytest.raises(ValueError, match=r"fmt must be one of \('fp8', 'mxfp4'\), got 'int4'"):
        quantized_bytes((4, 4), "int4")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantized_bytes((4, 40), "mxfp4")
