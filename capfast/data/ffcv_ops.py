"""Custom ffcv decoders for the `image` field (RGBImageField, mode jpg) and a safer epoch iterator.

ffcv's own image decoders either need one image size (Simple) or crop with an unseeded numba RNG
(RandomResizedCrop), and none normalizes. On the CPU, CropResizeDecoder does all of an image's work (decode,
seeded crop, resize, jitter, normalize) in ffcv's parallel stage, with boxes the loader draws per batch. The GPU
path crops in torch, so its decoders only read: the stored JPEG bytes, packed (for nvJPEG), and each image's
(height, width, nbytes) so torch knows where the real bytes end in the packed buffer.
"""

import sys
import time
from dataclasses import replace
from queue import Empty, Full

import numpy as np
from ffcv.libffcv import imdecode, memcpy
from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation

from capfast.data import resize_cpu

UINT8 = np.dtype("<u1")
INT64 = np.dtype("<i8")
NO_JITTER = -1.0  # a brightness factor below 0 tells resize_cpu to skip the colour jitter
BFLOAT16_NAN_BITS = 0x7FC0
# CropResizeDecoder's mark of an image that libjpeg-turbo could not decode: NaN as its first value, which a
# normalized pixel never is (see undecodable()).
DECODES_PER_CHUNK = 16  # CropResizeDecoder: images decoded back to back before they are resized (3 MB at 256²)


class JpegBytesDecoder(Operation):
    """The batch's JPEG bytes stored back to back from the start of its [B, max_bytes] uint8 buffer, in batch
    order, so that the consumer cuts them apart with one torch.split (sizes: ImageInfoDecoder's nbytes)."""

    def __init__(self, max_bytes: int):
        super().__init__()
        self.max_bytes = int(max_bytes)

    def declare_state_and_memory(self, previous_state):
        shape = (self.max_bytes,)
        return replace(previous_state, jit_mode=True, shape=shape, dtype=UINT8), AllocationQuery(shape, UINT8)

    def generate_code(self):
        mem_read = self.memory_read
        copy = Compiler.compile(memcpy)
        my_range = Compiler.get_iterator()

        def decode(batch_indices, destination, metadata, storage_state):
            n = len(batch_indices)
            packed = destination.reshape(-1)  # n rows of max_bytes: room for any n JPEGs
            ends = np.zeros(n + 1, dtype=np.int64)
            for i in range(n):
                ends[i + 1] = ends[i] + mem_read(metadata[batch_indices[i]]["data_ptr"], storage_state).size
            for i in my_range(n):
                data = mem_read(metadata[batch_indices[i]]["data_ptr"], storage_state)
                copy(data, packed[ends[i]:ends[i + 1]])
            return destination[:n]

        decode.is_parallel = True
        return decode


class CropResizeDecoder(Operation):
    """Each sample decoded (libjpeg-turbo), cropped, resized to size x size, colour-jittered and normalized
    (resize_cpu.crop_resize_normalize), in ffcv's parallel stage: the CPU loader's per-image work on all of the
    loader's threads. Output [size, size, 3] float32, or int16 holding bfloat16 bits.

    ffcv hands a decoder record indices only, so what changes per batch comes from batch_memory(), which
    GuardedEpochIterator calls on ffcv's thread before each batch: the crop boxes, the jitter factors, and an
    output array that the batch keeps for as long as it lives (ffcv reuses its own output slots a few batches
    later, under a consumer that may still hold them).
    """

    def __init__(self, size: int, dtype: np.dtype, shift, scale):
        super().__init__()
        self.size, self.dtype = int(size), np.dtype(dtype)
        # per-channel normalization constants, repeated along an output row as the kernel reads them
        self.shift = np.tile(np.asarray(shift, np.float32), self.size)
        self.scale = np.tile(np.asarray(scale, np.float32), self.size)

    def declare_state_and_memory(self, previous_state):
        self.max_pixels = int(self.metadata["height"].max()) * int(self.metadata["width"].max())
        state = replace(previous_state, jit_mode=True, shape=(self.size, self.size, 3), dtype=self.dtype)
        placeholder = AllocationQuery((1,), UINT8)  # batch_memory() provides the real buffers
        return state, (placeholder,) * 4

    def sizes(self, records: np.ndarray) -> np.ndarray:
        """int64 [n, 2]: (height, width) of each record."""
        rows = self.metadata[records]
        return np.stack([rows["height"], rows["width"]], axis=1).astype(np.int64)

    def epoch_buffers(self, batch_size: int, alive: int) -> "StageBuffers":
        """Buffers for one epoch iterator's batches (two epochs may run at once, so none are shared); `alive`:
        how many of its batches the loader may hold at once (more get arrays of their own)."""
        return StageBuffers((batch_size, self.size, self.size, 3), self.dtype, batch_size * self.max_pixels * 3,
                            alive)

    def batch_memory(self, boxes: np.ndarray, factors, buffers: "StageBuffers") -> tuple:
        """(output, decode scratch, boxes, factors): the decode function's memory for one batch of len(boxes)."""
        n = len(boxes)
        if factors is None:
            factors = np.full((n, 3), NO_JITTER, np.float32)
        return (buffers.output(n), buffers.scratch.reshape(-1, self.max_pixels * 3),
                np.ascontiguousarray(boxes, INT64), np.ascontiguousarray(factors, np.float32))

    def generate_code(self):
        mem_read = self.memory_read
        decode_c = Compiler.compile(imdecode)
        my_range = Compiler.get_iterator()
        finish = resize_cpu.crop_resize_normalize_by_pointer(self.dtype)
        shift, scale, size = self.shift, self.scale, self.size

        chunk = DECODES_PER_CHUNK
        failed_mark = self.dtype.type(BFLOAT16_NAN_BITS if self.dtype == np.int16 else np.nan)

        def decode(batch_indices, memory, metadata, storage_state):
            out, scratch, boxes, factors = memory
            n = len(batch_indices)
            for c in my_range((n + chunk - 1) // chunk):
                # Decode a chunk of images, then resize them: code that runs right after a libjpeg-turbo decode
                # runs slower for a while (~0.1 ms of a 0.35 ms resize here), so alternating costs more.
                first, end = c * chunk, min(n, (c + 1) * chunk)
                decoded = np.ones(end - first, np.bool_)
                for i in range(first, end):
                    field = metadata[batch_indices[i]]
                    data = mem_read(field["data_ptr"], storage_state)
                    h, w = np.uint32(field["height"]), np.uint32(field["width"])
                    decoded[i - first] = decode_c(data, scratch[i], h, w, h, w, 0, 0, 1, 1, False, False) == 0
                for i in range(first, end):
                    if not decoded[i - first]:
                        out[i].reshape(-1)[0] = failed_mark
                        continue
                    field = metadata[batch_indices[i]]
                    finish(scratch[i].ctypes.data, field["height"], field["width"], boxes[i].ctypes.data,
                           factors[i].ctypes.data, shift.ctypes.data, scale.ctypes.data, out[i].ctypes.data, size)
            return out

        decode.is_parallel = True
        return decode


def undecodable(images) -> "np.ndarray":
    """Positions in a CropResizeDecoder batch (a torch tensor [B, S, S, 3]) of the images it could not decode."""
    import torch

    first = images.reshape(len(images), -1)[:, 0]
    failed = first == BFLOAT16_NAN_BITS if first.dtype == torch.int16 else torch.isnan(first)
    return torch.nonzero(failed).flatten().numpy()


class StageBuffers:
    """One epoch iterator's decode scratch and output arrays. An output array is handed out again once nothing
    but this pool references it (the consumer has dropped its batch): a fresh array per batch would page-fault
    every 4 KB of it, which cost a third as much as the resize itself."""

    def __init__(self, output_shape: tuple, dtype: np.dtype, scratch_bytes: int, pool_size: int):
        self.output_shape, self.dtype, self.pool_size = output_shape, dtype, pool_size
        self.scratch = np.empty(scratch_bytes, UINT8)
        self.pool = []

    def output(self, n: int) -> np.ndarray:
        for array in self.pool:
            if sys.getrefcount(array) == 3:  # the pool's list, `array`, getrefcount's argument
                return array[:n]
        array = np.empty(self.output_shape, self.dtype)
        if len(self.pool) < self.pool_size:
            self.pool.append(array)
        return array[:n]


class ImageInfoDecoder(Operation):
    """(height, width, JPEG byte count) of each sample, int64."""

    def declare_state_and_memory(self, previous_state):
        shape = (3,)
        return replace(previous_state, jit_mode=True, shape=shape, dtype=INT64), AllocationQuery(shape, INT64)

    def generate_code(self):
        mem_read = self.memory_read

        def decode(batch_indices, destination, metadata, storage_state):
            for i in range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                destination[i, 0] = field["height"]
                destination[i, 1] = field["width"]
                destination[i, 2] = mem_read(field["data_ptr"], storage_state).size
            return destination[: len(batch_indices)]

        return decode


class GuardedEpochIterator(EpochIterator):
    """ffcv's epoch iterator over an explicit order, except that an error in its worker thread is raised in the
    consumer (ffcv's own leaves the consumer blocked on the queue forever), and close() stops the thread after
    the batch it is reading (ffcv's own reads on to the end of the epoch once its queue has room) and waits for it
    and for the process cache's page readers (os_cache=False).

    batch_memory: {operation: memory_for(batch number in this iterator, record indices) -> tuple of arrays}: the
    operation's memory for each batch, in place of ffcv's per-slot buffers (see CropResizeDecoder); called on
    ffcv's thread just before the batch runs.
    """

    _closed = False

    def __init__(self, loader, order, batch_memory=None):
        nodes = loader.graph.operation_to_node
        self._batch_memory = {nodes[op][0].id: memory_for for op, memory_for in (batch_memory or {}).items()}
        super().__init__(loader, order)  # starts the thread

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        if self.terminate_event.is_set():
            raise _Stopped
        allocations = self.memory_allocations["operation"]
        for node_id, memory_for in self._batch_memory.items():
            allocations[node_id] = tuple(_EverySlot(a) for a in memory_for(b_ix, batch_indices))
        return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)

    def run(self):
        try:
            super().run()
        except _Stopped:
            pass
        except Exception as error:  # re-raised in __next__, in the consumer's thread
            self._put(_Failure(error))

    def _put(self, item) -> None:
        while not self.terminate_event.is_set():
            try:
                self.output_queue.put(item, timeout=0.5)
                return
            except Full:
                pass

    def __next__(self):
        item = self.output_queue.get()
        if item is None or isinstance(item, _Failure):
            self.close()
            if item is None:
                raise StopIteration
            raise item.error
        slot, result = item
        if IS_CUDA:
            self.current_stream.wait_stream(self.cuda_streams[slot])
        return result

    def close(self):
        if self._closed:
            return
        self._closed = True
        self.terminate_event.set()
        # Wait for the thread to end: a process that exits while it runs a numba parallel loop aborts, and the
        # memory context below must outlive the thread's reads.
        deadline = time.monotonic() + 30
        while self.is_alive() and time.monotonic() < deadline:
            self._drain()
            self.join(timeout=0.05)
        super().close()
        for reader in getattr(getattr(self.memory_context, "executor", None), "threads", ()):
            reader.join(timeout=max(0.0, deadline - time.monotonic()))

    def _drain(self) -> None:
        """ffcv's thread ends an epoch with an unbounded put(None): when the consumer stopped early with the
        queue full, that put would block forever and keep the thread and its batch buffers alive."""
        while True:
            try:
                self.output_queue.get_nowait()
            except Empty:
                return


class _EverySlot:
    """Stands in for one of ffcv's per-slot buffers (indexed [slot][:batch size]): the same array in every slot."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __getitem__(self, slot) -> np.ndarray:
        return self.array


class _Stopped(Exception):
    """Raised on ffcv's thread before it reads another batch once close() was called."""


class _Failure:
    def __init__(self, error: Exception):
        self.error = error

