"""The CPU loader's per-image work after decoding: crop, resize, colour jitter, normalize (numba, no GIL).

It runs inside ffcv's parallel stage (see ffcv_ops.CropResizeDecoder), one image per call. The resize is
PyTorch's antialiased bilinear (the filter of augment.aa_weights) as two separable passes, rounded to integers
between and after them as PyTorch's uint8 kernel does. numba vectorizes loops over contiguous memory only, and a
horizontal pass over interleaved RGB is not one; so the crop's pixels are packed into uint32 and transposed
(columns become rows), the horizontal pass runs along those rows, its packed result is transposed back into RGB
rows, and the vertical pass and normalization run along image rows. Moving a pixel as one uint32 and the
multiply-adds over whole rows keep this within a small factor of OpenCV's hand-vectorized resize.
"""

import numpy as np
from numba import carray, cfunc, njit, types

# Contraction into FMAs only: 'reassoc' would let LLVM vectorize the short tap loops as reductions, which is
# several times slower here.
FASTMATH = {"contract", "nnan", "ninf", "nsz"}
F32 = np.float32
U32 = np.uint32


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def aa_taps(start, length, out_size):
    """(first input index, weights) of each output pixel when pixels [start, start + length) of a line are resized
    to out_size with PyTorch's antialiased bilinear filter (aten's upsample aa kernel, as augment.aa_weights).

    Every output gets as many taps as the widest window has nonzero weights (2 when enlarging), zero-padded and
    moved to stay inside the crop, so that the passes' loops have one trip count.
    """
    scale = length / out_size
    support = max(scale, 1.0)  # bilinear's half-width 1, stretched when downscaling
    inv_support = 1.0 / support
    lows = np.empty(out_size, np.int64)
    highs = np.empty(out_size, np.int64)
    ntaps = 1
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), length)
        while hi - lo > 1 and _tap(lo, center, inv_support) == 0.0:  # zero weights at the ends do nothing
            lo += 1
        while hi - lo > 1 and _tap(hi - 1, center, inv_support) == 0.0:
            hi -= 1
        lows[i], highs[i] = lo, hi
        ntaps = max(ntaps, hi - lo)
    first = np.empty(out_size, np.int64)
    weights = np.zeros((out_size, ntaps), np.float32)
    for i in range(out_size):
        center = scale * (i + 0.5)
        window = min(lows[i], length - ntaps)
        total = 0.0
        for x in range(lows[i], highs[i]):
            total += _tap(x, center, inv_support)
        for x in range(lows[i], highs[i]):
            weights[i, x - window] = _tap(x, center, inv_support) / total
        first[i] = start + window
    return first, weights


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def _tap(x, center, inv_support):
    return max(1.0 - abs((x - center + 0.5) * inv_support), 0.0)


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def packed_columns(image, top, left, height, width):
    """uint32 [width, height]: pixel (r, x) of the crop of `image` (uint8 [H, W * 3]) at [x, r], packed R | G << 8
    | B << 16 (so, as bytes, a column is R, G, B, 0, R, G, B, 0, ...)."""
    out = np.empty((width, height), np.uint32)
    cols = slice(left * 3, (left + width) * 3)
    blocked = height // 4 * 4
    for r in range(0, blocked, 4):  # four rows at once: one 16-byte store per column instead of four (-40 %)
        r0, r1 = image[top + r, cols], image[top + r + 1, cols]
        r2, r3 = image[top + r + 2, cols], image[top + r + 3, cols]
        for x in range(width):
            column = out[x]
            column[r], column[r + 1] = _packed(r0, x), _packed(r1, x)
            column[r + 2], column[r + 3] = _packed(r2, x), _packed(r3, x)
    for r in range(blocked, height):
        row = image[top + r, cols]
        for x in range(width):
            out[x, r] = _packed(row, x)
    return out


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def _packed(row, x):
    return U32(row[3 * x]) | (U32(row[3 * x + 1]) << U32(8)) | (U32(row[3 * x + 2]) << U32(16))


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def mixed_lines(lines, first, weights, acc):
    """acc[:] = sum over k of weights[k] * lines[first + k], as float32, in one pass for up to 3 taps (a separate
    pass per tap costs 2-3 times as much). Explicit loops throughout: numba's slice assignment (a[:] = b) is an
    element-wise loop several times slower than these vectorized ones."""
    n, taps = acc.shape[0], weights.shape[0]
    a, w0 = lines[first], weights[0]
    if taps == 1:
        for j in range(n):
            acc[j] = w0 * F32(a[j])
        return
    b, w1 = lines[first + 1], weights[1]
    if taps == 2:
        for j in range(n):
            acc[j] = w0 * F32(a[j]) + w1 * F32(b[j])
        return
    c, w2 = lines[first + 2], weights[2]
    for j in range(n):
        acc[j] = w0 * F32(a[j]) + w1 * F32(b[j]) + w2 * F32(c[j])
    for k in range(3, taps):
        line, w = lines[first + k], weights[k]
        for j in range(n):
            acc[j] += w * F32(line[j])


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def horizontal_pass(columns, left, xs, xw):
    """uint32 [round_up4(size), height]: output column ox of the horizontal resize at [ox], packed like columns;
    rows past size are left unset."""
    width, height = columns.shape
    size = xw.shape[0]
    lines = columns.view(np.uint8).reshape(width, height * 4)
    out = np.empty(((size + 3) // 4 * 4, height), np.uint32)
    out_bytes = out.view(np.uint8).reshape(out.shape[0], height * 4)
    acc = np.empty(height * 4, np.float32)
    for ox in range(size):
        rounded_lines(lines, xs[ox] - left, xw[ox], acc, out_bytes[ox])
    return out


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def rounded_lines(lines, first, weights, acc, out):
    """out[:] = mixed_lines(...) rounded to uint8, in the same pass for up to 2 taps."""
    n, taps = out.shape[0], weights.shape[0]
    if taps > 2:
        mixed_lines(lines, first, weights, acc)
        for j in range(n):
            out[j] = _to_u8(acc[j])
        return
    a, w0 = lines[first], weights[0]
    b, w1 = lines[first + taps - 1], weights[taps - 1] if taps == 2 else F32(0)
    for j in range(n):
        out[j] = _to_u8(w0 * F32(a[j]) + w1 * F32(b[j]))


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def _to_u8(value):
    """value (a mix of 0..255 values with weights >= 0 summing to 1, so no clamp) rounded to nearest, as uint8."""
    return np.uint8(np.int32(np.rint(value)))


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def rgb_rows(packed):
    """uint8 [height, round_up4(size) * 3]: RGB rows from packed output columns (uint32 [round_up4(size), height]),
    four pixels (16 packed bytes) at a time into three uint32 words."""
    quads, height = packed.shape[0] // 4, packed.shape[1]
    out = np.empty((height, quads * 12), np.uint8)
    words = out.view(np.uint32).reshape(height, quads * 3)
    for q in range(quads):  # reading four columns along their length is 2-3 times faster than across them
        c0, c1, c2, c3 = packed[4 * q], packed[4 * q + 1], packed[4 * q + 2], packed[4 * q + 3]
        for r in range(height):
            p0, p1, p2, p3 = c0[r], c1[r], c2[r], c3[r]
            words[r, 3 * q] = p0 | (p1 << U32(24))
            words[r, 3 * q + 1] = (p1 >> U32(8)) | (p2 << U32(16))
            words[r, 3 * q + 2] = (p2 >> U32(16)) | (p3 << U32(8))
    return out


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def vertical_row(rows, top, ys, yw, oy, out):
    """out[:] = output row oy of the resize (the first len(out) values of the rows), rounded to 0..255."""
    mixed_lines(rows, ys[oy] - top, yw[oy], out)
    for j in range(out.shape[0]):
        out[j] = np.floor(min(max(out[j] + F32(0.5), F32(0)), F32(255)))


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def normalized_row(rows, top, ys, yw, oy, scale, bias, acc, out):
    """out[:] = output row oy of the resize, rounded (half to even, as torch.round), normalized as v * scale + bias
    (bias = -mean * scale), float32: vertical_row and store in one pass. The filter's weights are >= 0 and sum to 1,
    so a mix of 0..255 values needs no clamp."""
    first, weights = ys[oy] - top, yw[oy]
    n, taps = out.shape[0], weights.shape[0]
    if taps == 2:
        a, b, w0, w1 = rows[first], rows[first + 1], weights[0], weights[1]
        for j in range(n):
            out[j] = np.rint(w0 * F32(a[j]) + w1 * F32(b[j])) * scale[j] + bias[j]
        return
    if taps == 3:
        a, b, c, w0, w1, w2 = rows[first], rows[first + 1], rows[first + 2], weights[0], weights[1], weights[2]
        for j in range(n):
            out[j] = np.rint(w0 * F32(a[j]) + w1 * F32(b[j]) + w2 * F32(c[j])) * scale[j] + bias[j]
        return
    mixed_lines(rows, first, weights, acc)
    for j in range(n):
        out[j] = np.rint(min(max(acc[j], F32(0)), F32(255))) * scale[j] + bias[j]


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def store(values, shift, scale, out):
    """out[:] = (values - shift) * scale, as float32 or, when `out` is int16, as bfloat16 bits (rounded to nearest
    even, as torch converts). shift and scale repeat the 3 channels' constants along the row."""
    if out.itemsize == 4:
        for j in range(values.shape[0]):
            out[j] = (values[j] - shift[j]) * scale[j]
        return
    for j in range(values.shape[0]):
        values[j] = (values[j] - shift[j]) * scale[j]
    bits, out_bits = values.view(np.uint32), out.view(np.uint16)
    for j in range(values.shape[0]):
        b = bits[j]
        out_bits[j] = np.uint16((b + U32(0x7FFF) + ((b >> U32(16)) & U32(1))) >> U32(16))


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def jitter_rows(resized, factors):
    """torchvision's adjust_brightness, _contrast, _saturation (augment.color_jitter) on float32 [S, S * 3]."""
    gray_r, gray_g, gray_b = F32(0.299), F32(0.587), F32(0.114)
    brightness, contrast, saturation = factors[0], factors[1], factors[2]
    total = 0.0
    for y in range(resized.shape[0]):
        row = resized[y]
        for j in range(row.shape[0]):
            row[j] = min(max(row[j] * brightness, F32(0)), F32(255))
        for p in range(row.shape[0] // 3):
            total += row[3 * p] * gray_r + row[3 * p + 1] * gray_g + row[3 * p + 2] * gray_b
    mean = F32(total / (resized.shape[0] * resized.shape[1] // 3))
    for y in range(resized.shape[0]):
        row = resized[y]
        for j in range(row.shape[0]):
            row[j] = min(max((row[j] - mean) * contrast + mean, F32(0)), F32(255))
        for p in range(row.shape[0] // 3):
            gray = row[3 * p] * gray_r + row[3 * p + 1] * gray_g + row[3 * p + 2] * gray_b
            for c in range(3):
                row[3 * p + c] = min(max((row[3 * p + c] - gray) * saturation + gray, F32(0)), F32(255))


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def crop_resize_normalize(image, box, factors, shift, scale, out):
    """One model input: crop `box` (top, left, height, width) of `image` (uint8 [H, W * 3]), resize it to
    out.shape[0] squared, colour-jitter it when factors[0] >= 0, and normalize it into `out` ([S, S * 3] float32,
    or int16 holding bfloat16)."""
    top, left, height, width = box[0], box[1], box[2], box[3]
    size = out.shape[0]
    xs, xw = aa_taps(left, width, size)
    ys, yw = aa_taps(top, height, size)
    rows = rgb_rows(horizontal_pass(packed_columns(image, top, left, height, width), left, xs, xw))
    row = np.empty(size * 3, np.float32)
    if factors[0] < 0 and out.itemsize == 4:
        bias = -shift * scale
        for oy in range(size):
            normalized_row(rows, top, ys, yw, oy, scale, bias, row, out[oy])
        return
    if factors[0] < 0:
        for oy in range(size):
            vertical_row(rows, top, ys, yw, oy, row)
            store(row, shift, scale, out[oy])
        return
    resized = np.empty((size, size * 3), np.float32)
    for oy in range(size):
        vertical_row(rows, top, ys, yw, oy, resized[oy])
    jitter_rows(resized, factors)
    for oy in range(size):
        store(resized[oy], shift, scale, out[oy])


# crop_resize_normalize behind a C function pointer, one per output dtype, for the CPU loader's decode stage
# (ffcv_ops.CropResizeDecoder): ffcv compiles that stage anew for every loader, and a call to a jitted function
# links the callee's code into it and optimizes it again (~2 s a loader), where a call by address links nothing.
# Arguments: image (uint8 [height, width * 3]), height, width, box (int64 [4]), factors (float32 [3]), shift and
# scale (float32 [size * 3]), out ([size, size * 3] of the dtype), size.
BY_POINTER = types.void(types.voidptr, types.intp, types.intp, types.voidptr, types.voidptr, types.voidptr,
                        types.voidptr, types.voidptr, types.intp)


@cfunc(BY_POINTER, cache=True)
def _to_float32(image, height, width, box, factors, shift, scale, out, size):
    crop_resize_normalize(carray(image, (height, width * 3), np.uint8), carray(box, 4, np.int64),
                          carray(factors, 3, np.float32), carray(shift, size * 3, np.float32),
                          carray(scale, size * 3, np.float32), carray(out, (size, size * 3), np.float32))


@cfunc(BY_POINTER, cache=True)
def _to_bfloat16_bits(image, height, width, box, factors, shift, scale, out, size):
    crop_resize_normalize(carray(image, (height, width * 3), np.uint8), carray(box, 4, np.int64),
                          carray(factors, 3, np.float32), carray(shift, size * 3, np.float32),
                          carray(scale, size * 3, np.float32), carray(out, (size, size * 3), np.int16))


def crop_resize_normalize_by_pointer(out_dtype: np.dtype):
    """crop_resize_normalize writing `out_dtype` (float32, or int16 holding bfloat16), as a ctypes function that
    jitted code calls with array addresses (arr.ctypes.data) and sizes."""
    return {np.dtype(np.float32): _to_float32, np.dtype(np.int16): _to_bfloat16_bits}[np.dtype(out_dtype)].ctypes
