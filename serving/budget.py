"""A per-replica budget of decoded pixel bytes in flight, so heavy images cannot exhaust memory.

Input limits alone (images per request x pixels per image x concurrent requests) allow tens of
GB of decoded pixels at once. Each request reserves what its images will take once decoded,
computed from their headers before any pixel is decoded; it waits while the replica is full,
and gets 503 with ``Retry-After`` if room does not come within ``wait_s``. The reservation is
released as soon as the images are preprocessed into the model's small input tensors.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from serving.errors import ApiError
from serving.schemas import DECODED_BYTES_PER_PIXEL


def decoded_bytes(width: int, height: int) -> int:
    """Peak memory of decoding and converting one ``width x height`` image (bytes): Pillow
    holds at most 4 bytes per pixel (RGBA, CMYK, I;16, I, F), and a mode conversion or resize
    holds a second copy while it runs."""
    return width * height * DECODED_BYTES_PER_PIXEL


class DecodeBudget:
    """Bytes of decoded pixels allowed in flight in one replica (asyncio, one event loop)."""

    def __init__(self, capacity_bytes: int, wait_s: float) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self.wait_s = wait_s
        self.in_use = 0
        self._changed: asyncio.Condition | None = None  # created on the replica's loop

    @asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the budget for the ``async with`` block.

        Raises:
            ApiError: 413 when one request alone needs more than the whole budget; 503 with
                ``Retry-After`` when the room does not come free within ``wait_s``.
        """
        if nbytes <= 0:
            yield
            return
        if nbytes > self.capacity:
            raise ApiError(413, f"the request's images need {nbytes // 2**20} MiB once decoded, "
                                f"more than this replica's decode budget of "
                                f"{self.capacity // 2**20} MiB; send fewer or smaller images")
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.in_use + nbytes <= self.capacity),
                    self.wait_s)
            except asyncio.TimeoutError:
                retry = max(1, math.ceil(self.wait_s))
                raise ApiError(503, "the replica is busy decoding other images; retry later",
                               {"Retry-After": str(retry)}) from None
            self.in_use += nbytes
        try:
            yield
        finally:
            async with self._changed:
                self.in_use -= nbytes
                self._changed.notify_all()
