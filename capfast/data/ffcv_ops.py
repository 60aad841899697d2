"""Custom ffcv decoders for the `image` field (RGBImageField, mode jpg) and a safer epoch iterator.

ffcv's own image decoders either need one image size (Simple) or crop with an unseeded numba RNG
(RandomResizedCrop). capfast crops in torch instead, so these decoders only read: the stored JPEG bytes, packed
(for nvJPEG on the GPU), the full decoded image (libjpeg-turbo on CPU threads), and each image's
(height, width, nbytes) so torch knows where the real pixels/bytes end in the padded buffers.
"""

import sys
import time
from dataclasses import replace
from queue import Empty, Full

import numpy as np
from ffcv.libffcv import imdecode, memcpy
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator

UINT8 = np.dtype("<u1")
INT64 = np.dtype("<i8")


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


class FullImageDecoder(Operation):
    """Each sample decoded whole (libjpeg-turbo) into the top-left of a [max_h, max_w, 3] uint8 slot."""

    def declare_state_and_memory(self, previous_state):
        self.max_h = int(self.metadata["height"].max())
        self.max_w = int(self.metadata["width"].max())
        shape = (self.max_h, self.max_w, 3)
        scratch = AllocationQuery((self.max_h * self.max_w * 3,), UINT8)
        state = replace(previous_state, jit_mode=True, shape=shape, dtype=UINT8)
        return state, (AllocationQuery(shape, UINT8), scratch)

    def generate_code(self):
        mem_read = self.memory_read
        decode_c = Compiler.compile(imdecode)
        my_range = Compiler.get_iterator()
        max_w = self.max_w

        def decode(batch_indices, storage, metadata, storage_state):
            destination, scratch = storage
            for i in my_range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                data = mem_read(field["data_ptr"], storage_state)
                h, w = np.uint32(field["height"]), np.uint32(field["width"])
                if w == max_w:  # rows already have the slot's stride: decode in place
                    decode_c(data, destination[i], h, w, h, w, 0, 0, 1, 1, False, False)
                else:
                    decode_c(data, scratch[i], h, w, h, w, 0, 0, 1, 1, False, False)
                    destination[i, :h, :w] = scratch[i][: h * w * 3].reshape(h, w, 3)
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


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
    and for the process cache's page readers (os_cache=False)."""

    _closed = False

    def run(self):
        try:
            super().run()
        except _Stopped:
            pass
        except Exception as error:  # re-raised in __next__, in the consumer's thread
            self._put(_Failure(error))

    def run_pipeline(self, *args, **kwargs):
        if self.terminate_event.is_set():
            raise _Stopped
        return super().run_pipeline(*args, **kwargs)

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


class _Stopped(Exception):
    """Raised on ffcv's thread before it reads another batch once close() was called."""


class _Failure:
    def __init__(self, error: Exception):
        self.error = error


def _quiet_numba_finalizer_noise(unraisable, _default=sys.unraisablehook):
    """numba 0.68 raises a harmless KeyError from a dispatcher finalizer when ffcv's compiled pipelines are
    garbage-collected; Python prints it as 'Exception ignored in ...' on every loader. Hide just that one."""
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if isinstance(unraisable.exc_value, KeyError) and tb is not None and \
            tb.tb_frame.f_code.co_filename.endswith("numba/core/dispatcher.py"):
        return
    _default(unraisable)


sys.unraisablehook = _quiet_numba_finalizer_noise
