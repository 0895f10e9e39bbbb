"""Where a request's images are decoded: on the event loop when they declare few pixels, else on one
of a few decode threads that stops between images once the caller is gone or its deadline has passed.

Raw pixels of the model's own size skip decoding altogether. Errors are the decoder's own ImageError
(naming the image by its index) and DecodeStopped; the recognizer turns them into status codes.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from service.recognition.decode import Opened, Payload
from service.recognition.preprocess import Stop, open_batch, pixel_batch, raw_batch

# Requests whose images declare more pixels than this in all are decoded on a decode thread, so that
# one large photo (or a small file that declares a huge image) does not stall every other request on
# the event loop; decoding runs at roughly 15 ns a pixel, so this keeps inline work to a few ms.
INLINE_DECODE_PIXELS = 256 * 1024
# Decode threads: at most this many requests decode at once, each holding about one decoded image, so
# hostile requests cannot multiply the memory they take by their number.
DECODE_THREADS = 2


class DecodeStopped(Exception):
    """The caller's deadline passed while its images were being decoded."""


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def _release_freed_memory() -> None:
    """Hand memory freed by a big decode back to the OS. glibc keeps freed blocks of each thread's arena
    for reuse, so without this one 25M-pixel request leaves the process tens of MB bigger for good."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class DecodePool:
    """The decode threads, and the choice of where each request is decoded."""

    def __init__(self, threads: int = DECODE_THREADS) -> None:
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def pixels(self, payloads: Sequence[Payload], side: int, ink_polarity: str, max_pixels: int,
                     max_request_pixels: int, deadline: float | None) -> np.ndarray:
        """The request's images as one [n, side, side] MNIST-convention array (`preprocess`). Headers
        and the pixel budgets are checked before anything is decoded. `deadline`: time.monotonic()."""
        ready = raw_batch(payloads, side, max_pixels, ink_polarity)
        if ready is not None:
            return ready
        opened = open_batch(payloads, max_pixels, max_request_pixels)
        if sum(item.declared for item in opened) <= INLINE_DECODE_PIXELS:
            return pixel_batch(opened, side, ink_polarity, None)
        gone = threading.Event()

        def stop() -> None:
            if gone.is_set() or (deadline is not None and time.monotonic() >= deadline):
                raise DecodeStopped
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._threads, _decode, opened, side, ink_polarity, stop)
        except asyncio.CancelledError:
            gone.set()  # the thread sees it before its next image
            raise


def _decode(opened: list[Opened], side: int, ink_polarity: str, stop: Stop) -> np.ndarray:
    try:
        return pixel_batch(opened, side, ink_polarity, stop)
    finally:  # a big request, on a decode thread: give its memory back
        _release_freed_memory()
