"""The engine's queue of rows, shared fairly between requests.

A plain FIFO of rows lets one request of 2,000 prompts x n=16 hold every batch slot until all 32,000 rows are
done, and cancelling it means popping each of its rows. Here each request's rows are one group; the worker
takes rows round-robin over the groups (one from the first group, which then goes to the back), so a small
request waits for at most one row per other request ahead of it, and a request whose client left is removed
in one step (`withdraw`), its rows freed at once.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Group(deque, Generic[T]):
    """One request's rows still queued (compared by identity, so two equal groups are still two)."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__


class FairQueue(Generic[T]):
    """Round-robin over groups; `get`/`get_nowait`/`empty`/`qsize` as `queue.Queue`'s (raising queue.Empty)."""

    def __init__(self) -> None:
        self._groups: deque[Group[T]] = deque()
        self._size = 0
        self._cv = threading.Condition()

    def put_group(self, items: list[T]) -> Group[T]:
        """Queue one request's rows; the returned group is the handle `withdraw` takes."""
        group: Group[T] = Group(items)
        if group:
            with self._cv:
                self._groups.append(group)
                self._size += len(group)
                self._cv.notify()
        return group

    def withdraw(self, group: Group[T]) -> int:
        """Remove what is left of `group`; returns how many rows were still queued."""
        with self._cv:
            try:
                self._groups.remove(group)
            except ValueError:  # already drained
                return 0
            left = len(group)
            self._size -= left
            group.clear()
            return left

    def get(self, timeout: float | None = None) -> T:
        with self._cv:
            if not self._cv.wait_for(lambda: self._size > 0, timeout=timeout):
                raise queue.Empty
            return self._pop()

    def get_nowait(self) -> T:
        with self._cv:
            if not self._size:
                raise queue.Empty
            return self._pop()

    def _pop(self) -> T:
        group = self._groups.popleft()
        item = group.popleft()
        if group:
            self._groups.append(group)
        self._size -= 1
        return item

    def empty(self) -> bool:
        return self._size == 0

    def qsize(self) -> int:
        return self._size
