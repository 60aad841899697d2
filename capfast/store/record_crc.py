"""schema.record_checksum over many records of a mapped beton in one compiled loop, without the GIL: zlib's own
crc32 called from numba. In Python the work around each record's hash held the GIL for about as long as the hash
itself, so two threads verified at 0.7 of a plain read's rate (tools/results/2026-12-07_records-verify_2vcpu.md)."""

import ctypes
import ctypes.util

import numba
import numpy as np

_zlib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1")
_crc32 = _zlib.crc32  # zlib.crc32's C function: the same CRC-32, chained the same way
_crc32.restype = ctypes.c_ulong
_crc32.argtypes = (ctypes.c_ulong, ctypes.c_void_p, ctypes.c_uint)


@numba.njit(nogil=True)  # not cached: numba cannot cache a function that calls through a ctypes pointer
def mismatches(data, image_ptr, image_size, caption_ptr, caption_nbytes, values):
    """Positions i (ascending) whose checksum, as schema.record_checksum computes it from the image bytes
    data[image_ptr[i]:][:image_size[i]], the caption rows data[caption_ptr[i]:][:caption_nbytes] and values[i, :4],
    differs from values[i, 4]. data: the file as uint8."""
    found = np.empty(len(image_ptr), np.int64)
    count = 0
    packed = np.empty(4, np.int64)  # height, width, ncaptions, image_id as little-endian int64 (as struct "<4q")
    packed_bytes = packed.view(np.uint8)
    for i in range(len(image_ptr)):
        crc = _crc32(0, data[image_ptr[i]:].ctypes.data, image_size[i])
        crc = _crc32(crc, data[caption_ptr[i]:].ctypes.data, caption_nbytes)
        for k in range(4):
            packed[k] = values[i, k]
        crc = _crc32(crc, packed_bytes.ctypes.data, 32)
        if crc != values[i, 4]:
            found[count] = i
            count += 1
    return found[:count]
