"""Quantised weights from scratch: block-scaled FP8 and MXFP4, in the layouts real MoE checkpoints ship.

A weight stored in 8 or 4 bits cannot hold a layer's range of values by itself, so each small block
of weights shares one scale, stored beside them, and a weight's value is (its low-precision number)
x (its block's scale). Two such formats carry today's large MoE models:

- **Block-scaled FP8** (DeepSeek-V3, arXiv 2412.19437, section 3.3; Kimi K2; Qwen3-*-FP8): every
  linear weight in float8 e4m3 (1 sign, 4 exponent, 3 mantissa bits; finite values up to 448, no
  infinities), and one float32 `weight_scale_inv` per 128 x 128 block of the (out, in) matrix; the
  blocks at the right and bottom edges may be partial. config.json: quant_method "fp8",
  weight_block_size [128, 128]. Value = fp8 number x weight_scale_inv.
- **MXFP4** (OCP Microscaling Formats (MX) v1.0 specification, 2023; gpt-oss model card,
  arXiv 2508.10925): blocks of 32 consecutive weights along the input dimension, each a 4-bit
  e2m1 float (1 sign, 2 exponent, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives),
  two per byte (the first in the low nibble), and one e8m0 scale per block: a byte s standing for
  2^(s - 127). gpt-oss stores its experts this way (`*_blocks`: uint8 (..., rows, in/32, 16),
  `*_scales`: uint8 (..., rows, in/32)); attention and the rest stay bfloat16. 4.25 bits per weight.

Functions (W: (..., rows, cols), any leading dimensions, e.g. E stacked experts):
  quantize_fp8_blockwise(w, block)         -> (w_fp8, scale_inv)
  dequantize_fp8_blockwise(w_fp8, scale_inv, block, dtype) -> w
  quantize_mxfp4(w)                        -> (blocks, scales)
  dequantize_mxfp4(blocks, scales, dtype)  -> w
  fp8_error_bound(w, scale_inv, block), mxfp4_error_bound(w, scales): the largest error each
  quantiser may make, per weight (tests/test_quant.py checks both, and that they are attained).

tests/test_quant.py checks the dequantisers bit for bit against transformers' own code
(integrations.finegrained_fp8 and integrations.mxfp4). Only torch is needed.
"""
import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                                         # torch.finfo(torch.float8_e4m3fn).max
# The 16 e2m1 codes in order: bit 3 the sign, bits 0-2 the magnitude's index in E2M1_MAGNITUDES.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES)
MX_BLOCK = 32                                           # values sharing one scale in MXFP4
E8M0_BIAS = 127                                         # an e8m0 byte s stands for 2^(s - 127); 255 is NaN
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_weight(w, name="w"):
    if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float tensor ({', '.join(map(str, _FLOAT_DTYPES))}), "
                         f"got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., rows, cols), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} must hold finite values only (it has inf or NaN)")


def _check_block(block):
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"block must be two positive ints (rows, cols), e.g. (128, 128), got {block!r}")
    return tuple(block)


def _grid(shape, block):
    """Blocks along rows and columns of a (..., rows, cols) shape: ceil-divisions (partial edges count)."""
    return -(-shape[-2] // block[0]), -(-shape[-1] // block[1])


# ----------------------------------------------------------------------------------------------
# Block-scaled FP8.

def quantize_fp8_blockwise(w, block=(128, 128)):
    """Quantise w (..., M, N) to float8 e4m3 with one float32 scale per block of block[0] x block[1]
    weights: returns (w_fp8 (..., M, N) torch.float8_e4m3fn, scale_inv (..., ceil(M/bm), ceil(N/bn))
    float32), the layout of DeepSeek-V3 and Qwen3-FP8 checkpoints; the last block of a row or
    column of blocks may be partial.

    Each block's scale_inv is its largest |w| divided by 448, so the block's largest weight becomes
    +-448, the largest e4m3 number, and every other weight w / scale_inv is rounded to the nearest
    e4m3 number (ties to even). A block of zeros gets scale_inv 1. w: float32, bfloat16 or float16,
    finite.
    """
    _check_weight(w)
    block = _check_block(block)
    *lead, M, N = w.shape
    gm, gn = _grid(w.shape, block)
    padded = torch.zeros(*lead, gm * block[0], gn * block[1], dtype=torch.float32, device=w.device)
    padded[..., :M, :N] = w                                             # zeros change no block's max
    tiles = padded.view(*lead, gm, block[0], gn, block[1])
    amax = tiles.abs().amax(dim=(-3, -1))                               # (..., gm, gn)
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = tiles / scale_inv[..., :, None, :, None]
    w_fp8 = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)               # clamp: float32 rounding may pass 448
    return w_fp8.view(*lead, gm * block[0], gn * block[1])[..., :M, :N].contiguous(), scale_inv


def dequantize_fp8_blockwise(w_fp8, scale_inv, block=(128, 128), dtype=torch.float32):
    """The weights of a block-scaled FP8 tensor: w_fp8 (..., M, N) float8_e4m3fn times its block's
    scale_inv (..., ceil(M/bm), ceil(N/bn)), computed in float32 and rounded once to `dtype`.

    The block size cannot be read off the shapes when edge blocks are partial (a 200-row weight
    with 2 rows of scales may have blocks of 100 or of 128 rows), so it is an argument: the
    checkpoint's weight_block_size. Raises ValueError for wrong dtypes or a scale grid that does
    not fit the block size.
    """
    block = _check_block(block)
    if not isinstance(w_fp8, torch.Tensor) or w_fp8.dtype != FP8_DTYPE or w_fp8.dim() < 2:
        raise ValueError(f"w_fp8 must be a torch.float8_e4m3fn tensor of at least 2 dimensions, got "
                         f"{getattr(w_fp8, 'dtype', type(w_fp8).__name__)} of shape {tuple(getattr(w_fp8, 'shape', ()))}")
    if not isinstance(scale_inv, torch.Tensor) or not scale_inv.is_floating_point():
        raise ValueError(f"scale_inv must be a float tensor, got {getattr(scale_inv, 'dtype', type(scale_inv).__name__)}")
    expected = (*w_fp8.shape[:-2], *_grid(w_fp8.shape, block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)}; a weight of shape {tuple(w_fp8.shape)} in "
                         f"blocks of {block} needs {expected}")
    M, N = w_fp8.shape[-2:]
    scale = scale_inv.float().repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., :M, :N]
    return (w_fp8.float() * scale).to(dtype)


def fp8_error_bound(w, scale_inv, block=(128, 128)):
    """The most |dequantize(quantize(w)) - w| can be, per weight: (..., M, N) float32.

    Rounding to e4m3 (3 mantissa bits) errs by at most half a step: 2^-4 of the value for normal
    numbers, and 2^-10 (half the subnormal step 2^-9) below the smallest normal 2^-6; in weight
    units, max(|w| / 16, scale_inv / 1024). 2^-20 |w| is added for the float32 roundings of the
    division and the product.
    """
    M, N = w.shape[-2:]
    scale = scale_inv.float().repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., :M, :N]
    a = w.float().abs()
    return torch.maximum(a / 16, scale / 1024) + a * 2.0 ** -20


# ----------------------------------------------------------------------------------------------
# MXFP4.

def _e2m1_codes(x):
    """Round x (scaled so that |x| <= 6) to the nearest e2m1 value, ties to the even code (the
    OCP rule: round to nearest, ties to even): the 4-bit codes, int64 of x's shape."""
    magnitudes = torch.tensor(E2M1_MAGNITUDES, device=x.device)
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2                   # 0.25, 0.75, ..., 5
    a = x.abs()
    code = torch.bucketize(a, midpoints)               # code i: midpoints[i-1] < a <= midpoints[i]
    tie = a == midpoints[code.clamp(max=len(midpoints) - 1)]
    code = torch.where(tie & (code % 2 == 1), code + 1, code)           # a tie goes to the even neighbour
    return code + 8 * (x < 0)


def mx_exponents(amax):
    """The scale exponent e of MXFP4 blocks whose largest |w| is amax: the smallest integer with
    6 * 2^e >= amax, so that no weight of the block is clipped, clamped to e8m0's range
    [-127, 127]. Exact integer arithmetic on amax = m * 2^x (m in [0.5, 1)): 6 * 2^(x-3) = 0.75 * 2^x
    covers amax when m <= 0.75, else 6 * 2^(x-2) does. int32, amax's shape."""
    m, x = torch.frexp(amax.float())
    e = torch.where(m <= 0.75, x - 3, x - 2)
    e = torch.where(amax > 0, e, torch.full_like(e, -E8M0_BIAS))
    return e.clamp(-E8M0_BIAS, E8M0_BIAS)


def quantize_mxfp4(w):
    """Quantise w (..., N, K) to MXFP4 in gpt-oss's layout: blocks of 32 consecutive weights along
    the last dimension (K, a multiple of 32: an expert's input dimension), each weight an e2m1
    code, two per byte (the first of a pair in the low nibble), and one e8m0 scale per block.
    Returns (blocks uint8 (..., N, K/32, 16), scales uint8 (..., N, K/32)).

    A block's scale is 2^e with e the smallest integer for which 6 * 2^e covers the block's
    largest |w| (mx_exponents), so nothing is clipped; every weight w / 2^e is then rounded to the
    nearest e2m1 value, ties to even. (The OCP specification's suggested rule takes
    e = floor(log2(amax)) - 2 instead, up to half this scale, and saturates the weights above
    6 * 2^e to +-6: more resolution, but clipping. Both are valid MXFP4: the dequantiser reads
    either.)
    """
    _check_weight(w)
    *lead, N, K = w.shape
    if K % MX_BLOCK:
        raise ValueError(f"the last dimension of w must be a multiple of {MX_BLOCK} (MXFP4 blocks have no "
                         f"partial edge), got shape {tuple(w.shape)}")
    tiles = w.float().reshape(*lead, N, K // MX_BLOCK, MX_BLOCK)
    e = mx_exponents(tiles.abs().amax(-1))                              # (..., N, K/32)
    codes = _e2m1_codes(torch.ldexp(tiles, -e[..., None].float()))      # (..., N, K/32, 32), exact scaling
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)                 # low nibble: the even position
    return packed.to(torch.uint8), (e + E8M0_BIAS).to(torch.uint8)


def dequantize_mxfp4(blocks, scales, dtype=torch.bfloat16):
    """The weights of MXFP4 blocks: blocks uint8 (..., N, G, 16) and scales uint8 (..., N, G) ->
    (..., N, 32 G) in `dtype`. Each byte holds two e2m1 codes (the low nibble first); each block's
    32 values are multiplied by 2^(scale - 127), exactly (a power of two). A scale byte of 255
    (NaN in e8m0) gives NaN.
    """
    for name, t in (("blocks", blocks), ("scales", scales)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            raise ValueError(f"{name} must be a torch.uint8 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if blocks.dim() < 2 or blocks.shape[-1] != MX_BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"blocks must be (..., G, {MX_BLOCK // 2}) and scales (..., G) with the same leading "
                         f"shape, got {tuple(blocks.shape)} and {tuple(scales.shape)}")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()     # (..., G, 32)
    exponent = scales.to(torch.int32) - E8M0_BIAS
    values = torch.ldexp(table[codes], exponent[..., None].float())
    values = torch.where(scales[..., None] == 255, torch.full_like(values, float("nan")), values)
    return values.flatten(-2).to(dtype)


def mxfp4_error_bound(w, scales):
    """The most |dequantize_mxfp4(quantize_mxfp4(w)) - w| can be, per weight: (..., N, K) float32.

    With the block's scale 2^e, a weight is x = w / 2^e with |x| <= 6, and e2m1's steps are 0.5 up
    to 2, 1 up to 4 and 2 up to 6: rounding errs by at most a quarter of max(|x|, 1), so by
    max(|w|, 2^e) / 4. Since 6 * 2^(e-1) < amax, 2^e < amax / 3: at most amax / 12 for the block's
    small weights, a quarter of the value for the others.
    """
    scale = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - E8M0_BIAS)
    scale = scale.repeat_interleave(MX_BLOCK, -1)
    return torch.maximum(w.float().abs(), scale) / 4


def quantized_bytes(shape, fmt, block=(128, 128)):
    """Bytes a weight of shape (..., M, N) takes stored in fmt: "fp8" (1 byte per weight plus a
    4-byte scale per block, partial edge blocks included) or "mxfp4" (half a byte per weight plus a
    1-byte scale per 32)."""
    *lead, M, N = shape
    n_matrices = 1
    for d in lead:
        n_matrices *= d
    if fmt == "fp8":
        gm, gn = _grid(shape, _check_block(block))
        return n_matrices * (M * N + 4 * gm * gn)
    if fmt == "mxfp4":
        if N % MX_BLOCK:
            raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {MX_BLOCK}, got shape {tuple(shape)}")
        return n_matrices * (M * N // 2 + M * N // MX_BLOCK)
    raise ValueError(f"fmt must be one of ('fp8', 'mxfp4'), got {fmt!r}")
