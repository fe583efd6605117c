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
  fp8_error_bound(w, scale_inv, block), mxfp4_error_bound(w, scales): an upper bound on each
  quantiser's error, per weight (tests/test_quant.py checks both, and that they are nearly reached)
  quantized_bytes(shape, fmt, block)      -> bytes stored
  check_block(block, name)                 -> (rows, cols), or a ValueError

tests/test_quant.py checks the dequantisers bit for bit against transformers' own code
(integrations.finegrained_fp8 and integrations.mxfp4). Only torch is needed.
"""
import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                                         # torch.finfo(torch.float8_e4m3fn).max
FP8_BLOCK = (128, 128)                                  # DeepSeek-V3's weight_block_size (rows, cols)
FP8_SCALE_BYTES = 4                                     # one float32 weight_scale_inv per block
# The 16 e2m1 codes in order: bit 3 the sign, bits 0-2 the magnitude's index in E2M1_MAGNITUDES.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES)
MX_BLOCK = 32                                           # values sharing one scale in MXFP4
E2M1_BITS, E8M0_BITS = 4, 8                             # bits of an MXFP4 value and of its block's scale
E8M0_BIAS = 127                                         # an e8m0 byte s stands for 2^(s - 127); 255 is NaN
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_TINY = torch.finfo(torch.float32).tiny         # the smallest normal float32, 2^-126


def _check_weight(w, name="w"):
    if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float tensor ({', '.join(map(str, _FLOAT_DTYPES))}), "
                         f"got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., rows, cols), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} must hold finite values only (it has inf or NaN)")
    if w.dtype == torch.float64 and w.numel() and w.abs().max() > _FLOAT32_MAX:
        raise ValueError(f"{name} must hold values within float32's range (|w| <= {_FLOAT32_MAX:.4g}): the "
                         f"quantisers compute in float32; got a largest |w| of {w.abs().max().item():.4g}")


def check_block(block, name="block", allow_none=False):
    """block as a (rows, cols) tuple of two positive ints (a list is accepted too); None passes when
    allow_none. Else a ValueError naming `name`. The one check of a block size, used by
    utils.hf_to_course (weight_block_size) and utils.checkpoints (fp8_block_size) as well."""
    if block is None and allow_none:
        return None
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        allowed = "None or two positive ints" if allow_none else "two positive ints"
        raise ValueError(f"{name} must be {allowed} (rows, cols), e.g. (128, 128), got {block!r}")
    return tuple(block)


def _scale_blockwise_(t, scales, block):
    """Multiply t (..., M, N), in place, by per-block factors scales (..., ceil(M/bm), ceil(N/bn)):
    each block of t by its factor, broadcast over a view of the block (no tensor of t's size is
    made). The full blocks, the partial last row of blocks, the partial last column and the
    corner are four views. Returns t."""
    M, N = t.shape[-2:]
    rows_full, cols_full = M // block[0], N // block[1]
    row_parts = ((slice(0, rows_full * block[0]), slice(0, rows_full)), (slice(rows_full * block[0], M), slice(rows_full, None)))
    col_parts = ((slice(0, cols_full * block[1]), slice(0, cols_full)), (slice(cols_full * block[1], N), slice(cols_full, None)))
    for rows, scale_rows in row_parts:
        for cols, scale_cols in col_parts:
            part, factor = t[..., rows, cols], scales[..., scale_rows, scale_cols]
            if part.numel():
                tiles = part.unflatten(-1, (factor.shape[-1], -1)).unflatten(-3, (factor.shape[-2], -1))
                tiles.mul_(factor[..., :, None, :, None])         # a view of part: t changes
    return t


def _grid(shape, block):
    """Blocks along rows and columns of a (..., rows, cols) shape: ceil-divisions (partial edges count)."""
    return -(-shape[-2] // block[0]), -(-shape[-1] // block[1])


# ----------------------------------------------------------------------------------------------
# Block-scaled FP8.

def quantize_fp8_blockwise(w, block=FP8_BLOCK):
    """Quantise w (..., M, N) to float8 e4m3 with one float32 scale per block of block[0] x block[1]
    weights: returns (w_fp8 (..., M, N) torch.float8_e4m3fn, scale_inv (..., ceil(M/bm), ceil(N/bn))
    float32), the layout of DeepSeek-V3 and Qwen3-FP8 checkpoints; the last block of a row or
    column of blocks may be partial.

    Each block's scale_inv is its largest |w| divided by 448, so the block's largest weight becomes
    +-448, the largest e4m3 number, and every other weight w / scale_inv is rounded to the nearest
    e4m3 number (ties to even). A block of zeros gets scale_inv 1, and a block whose largest |w| is
    below 448 x 2^-126 (where amax / 448 would leave float32's normal range, or underflow to 0 and
    give NaN) gets the smallest normal float32, 2^-126: its weights then use less than e4m3's range.
    w: float32, bfloat16, float16 or float64 (finite, within float32's range: the arithmetic is
    float32); a ValueError otherwise.
    """
    _check_weight(w)
    block = check_block(block)
    *lead, M, N = w.shape
    gm, gn = _grid(w.shape, block)
    padded = torch.zeros(*lead, gm * block[0], gn * block[1], dtype=torch.float32, device=w.device)
    padded[..., :M, :N] = w                                             # zeros change no block's max
    tiles = padded.view(*lead, gm, block[0], gn, block[1])
    amax = tiles.abs().amax(dim=(-3, -1))                               # (..., gm, gn)
    scale_inv = torch.where(amax > 0, (amax / FP8_MAX).clamp_min(_FLOAT32_TINY), torch.ones_like(amax))
    scaled = tiles / scale_inv[..., :, None, :, None]
    w_fp8 = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)               # clamp: float32 rounding may pass 448
    return w_fp8.view(*lead, gm * block[0], gn * block[1])[..., :M, :N].contiguous(), scale_inv


def dequantize_fp8_blockwise(w_fp8, scale_inv, block=FP8_BLOCK, dtype=torch.float32):
    """The weights of a block-scaled FP8 tensor: w_fp8 (..., M, N) float8_e4m3fn times its block's
    scale_inv (..., ceil(M/bm), ceil(N/bn)), computed in float32 and rounded once to `dtype`.

    The block size cannot be read off the shapes when edge blocks are partial (a 200-row weight
    with 2 rows of scales may have blocks of 100 or of 128 rows), so it is an argument: the
    checkpoint's weight_block_size. Raises ValueError for wrong dtypes or a scale grid that does
    not fit the block size. Memory: the float32 result, and a copy in `dtype` if that is another;
    the scales are broadcast over views of the blocks, never expanded to the weight's size.
    """
    block = check_block(block)
    if not isinstance(w_fp8, torch.Tensor) or w_fp8.dtype != FP8_DTYPE or w_fp8.dim() < 2:
        raise ValueError(f"w_fp8 must be a torch.float8_e4m3fn tensor of at least 2 dimensions, got "
                         f"{getattr(w_fp8, 'dtype', type(w_fp8).__name__)} of shape {tuple(getattr(w_fp8, 'shape', ()))}")
    if not isinstance(scale_inv, torch.Tensor) or not scale_inv.is_floating_point():
        raise ValueError(f"scale_inv must be a float tensor, got {getattr(scale_inv, 'dtype', type(scale_inv).__name__)}")
    expected = (*w_fp8.shape[:-2], *_grid(w_fp8.shape, block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)}; a weight of shape {tuple(w_fp8.shape)} in "
                         f"blocks of {block} needs {expected}")
    return _scale_blockwise_(w_fp8.float(), scale_inv.float(), block).to(dtype)


def fp8_error_bound(w, scale_inv, block=FP8_BLOCK):
    """An upper bound on |dequantize(quantize(w)) - w|, per weight: (..., M, N) float32, for w and
    the scale_inv (..., ceil(M/bm), ceil(N/bn)) quantize_fp8_blockwise gave it.

    Rounding to e4m3 (3 mantissa bits) errs by at most half a step: 2^-4 of the value for normal
    numbers, and 2^-10 (half the subnormal step 2^-9) below the smallest normal 2^-6; in weight
    units, max(|w| / 16, scale_inv / 1024). So for weights below 2^-6 x scale_inv (= amax / 28672)
    the relative error can exceed 1/16. 2^-20 |w| is added for the float32 roundings of the
    division and the product. Raises ValueError for a w or scale_inv of the wrong kind or shape.
    """
    _check_weight(w)
    block = check_block(block)
    expected = (*w.shape[:-2], *_grid(w.shape, block))
    if not isinstance(scale_inv, torch.Tensor) or not scale_inv.is_floating_point() or tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv must be a float tensor of shape {expected} (w {tuple(w.shape)} in blocks of "
                         f"{block}), got {getattr(scale_inv, 'dtype', type(scale_inv).__name__)} of shape "
                         f"{tuple(getattr(scale_inv, 'shape', ()))}")
    a = w.float().abs()
    subnormal = _scale_blockwise_(torch.full_like(a, 2.0 ** -10), scale_inv.float(), block)   # scale_inv / 1024
    return torch.maximum(a / 16, subnormal) + a * 2.0 ** -20


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
    """An upper bound on |dequantize_mxfp4(quantize_mxfp4(w)) - w|, per weight: (..., N, K) float32,
    for w and the e8m0 scales (..., N, K/32) its blocks were quantised with.

    With the block's scale 2^e, a weight is x = w / 2^e with |x| <= 6, and e2m1's steps are 0.5 up
    to 2, 1 up to 4 and 2 up to 6: rounding errs by at most a quarter of max(|x|, 1), so by
    max(|w|, 2^e) / 4. For |w| >= 2^e that is a quarter of the value (reached only where |x| sits
    midway between two steps, as 2.5 between 2 and 3); below 2^e the bound is 2^e / 4, and weights
    under 2^e / 4 round to 0, a relative error of 1. With quantize_mxfp4's scale, 2^e < amax / 3,
    so 2^e / 4 < amax / 12. Raises ValueError for a w or scales of the wrong kind or shape.
    """
    _check_weight(w)
    if w.shape[-1] % MX_BLOCK:
        raise ValueError(f"the last dimension of w must be a multiple of {MX_BLOCK}, got shape {tuple(w.shape)}")
    expected = (*w.shape[:-1], w.shape[-1] // MX_BLOCK)
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.uint8 or tuple(scales.shape) != expected:
        raise ValueError(f"scales must be a torch.uint8 tensor of shape {expected} (one per {MX_BLOCK} weights of w "
                         f"{tuple(w.shape)}), got {getattr(scales, 'dtype', type(scales).__name__)} of shape "
                         f"{tuple(getattr(scales, 'shape', ()))}")
    scale = torch.ldexp(torch.ones(scales.shape, device=scales.device), scales.to(torch.int32) - E8M0_BIAS)
    a = w.float().abs().unflatten(-1, (-1, MX_BLOCK))                    # (..., N, K/32, 32): a view per block
    return torch.maximum(a, scale[..., None]).flatten(-2) / 4


def quantized_bytes(shape, fmt, block=FP8_BLOCK):
    """Bytes a weight of shape (..., M, N) takes stored in fmt: "fp8" (1 byte per weight plus a
    4-byte scale per block, partial edge blocks included) or "mxfp4" (half a byte per weight plus a
    1-byte scale per 32)."""
    *lead, M, N = shape
    n_matrices = 1
    for d in lead:
        n_matrices *= d
    if fmt == "fp8":
        gm, gn = _grid(shape, check_block(block))
        return n_matrices * (M * N + FP8_SCALE_BYTES * gm * gn)
    if fmt == "mxfp4":
        if N % MX_BLOCK:
            raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {MX_BLOCK}, got shape {tuple(shape)}")
        return n_matrices * M * N // MX_BLOCK * (MX_BLOCK * E2M1_BITS + E8M0_BITS) // 8
    raise ValueError(f"fmt must be one of ('fp8', 'mxfp4'), got {fmt!r}")
