"""Live and peak bytes of every tensor storage a process allocates, fake or real.

:class:`AllocationTracker` is a ``TorchDispatchMode``: every op's output storages are counted when
they appear and uncounted when Python frees them (a weak reference per storage), storage resizes
(``offload``'s ``resize_(0)`` and back) adjust them. It is the bookkeeping of
``torch.distributed._tools.mem_tracker.MemTracker`` without its per-module statistics: MemTracker
sums all live storages after every op (a full-size step took 1,142 s on 2 cores; this tracker
30-40 s) and needs its hooks kept off the frozen teacher. The parts (parameters, gradients,
optimizer state) are attributed afterwards from the objects that own the storages
(:func:`storage_bytes`); activations and temporaries are what a phase adds on top of what was live
when it began (:meth:`AllocationTracker.phase`).

Allocations made inside :meth:`AllocationTracker.host` (the CPU-offloaded optimizer's copies and
step) are counted apart, as host memory.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0  # device bytes alive now
        self.peak = 0
        self.host_live = 0
        self._seen: dict = {}  # id(storage) -> [weakref, bytes, host]
        self._host_depth = 0
        self._phase_peaks: list = []
        self._resize_orig = None

    # -- counting -----------------------------------------------------------------------------------
    def _add(self, st) -> None:
        key = id(st)
        entry = self._seen.get(key)
        if entry is not None and entry[0]() is st:
            return
        host = self._host_depth > 0
        nbytes = st.nbytes()

        def gone(_ref, key=key):
            e = self._seen.pop(key, None)
            if e is not None:
                self._count(-e[1], e[2])

        self._seen[key] = [weakref.ref(st, gone), nbytes, host]
        self._count(nbytes, host)

    def _count(self, delta: int, host: bool) -> None:
        if host:
            self.host_live += delta
            return
        self.live += delta
        if self.live > self.peak:
            self.peak = self.live
        for p in self._phase_peaks:
            if self.live > p[0]:
                p[0] = self.live

    def _resized(self, st, nbytes: int) -> None:
        entry = self._seen.get(id(st))
        if entry is not None and entry[0]() is st:
            self._count(nbytes - entry[1], entry[2])
            entry[1] = nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                try:
                    self._add(t.untyped_storage())
                except (NotImplementedError, RuntimeError):  # sparse / storage-less tensors
                    pass
        return out

    def track(self, tensors) -> None:
        """Count tensors that exist already (made before the tracker started)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())

    # -- contexts -----------------------------------------------------------------------------------
    def __enter__(self):
        tracker = self
        orig = torch.UntypedStorage.resize_

        def resize_(st, size):
            out = orig(st, size)
            tracker._resized(st, st.nbytes())
            return out

        self._resize_orig = orig
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize_orig
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def host(self):
        """Allocations made inside are host memory (not the device's live/peak)."""
        self._host_depth += 1
        try:
            yield
        finally:
            self._host_depth -= 1

    @contextlib.contextmanager
    def apart(self):
        """The phases open now do not see what happens inside (a phase measured on its own)."""
        saved, self._phase_peaks = self._phase_peaks, []
        try:
            yield
        finally:
            self._phase_peaks = saved

    @contextlib.contextmanager
    def phase(self):
        """``with tracker.phase() as p:`` - afterwards ``p["start"]`` (device bytes live at entry),
        ``p["peak"]`` (the most live inside), ``p["end"]``."""
        rec = [self.live]
        result = {"start": self.live}
        self._phase_peaks.append(rec)
        try:
            yield result
        finally:
            self._phase_peaks = [q for q in self._phase_peaks if q is not rec]
            result["peak"], result["end"] = rec[0], self.live


def storage_bytes(tensors, exclude=()) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once), leaving out
    the storages of ``exclude``."""
    seen, total = {_key(t) for t in exclude if isinstance(t, torch.Tensor)}, 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        st = t.untyped_storage()
        key = _key(t)
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def _key(t):
    st = t.untyped_storage()
    return id(st) if _is_fake(t) else (st.data_ptr(), st.nbytes())


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)
