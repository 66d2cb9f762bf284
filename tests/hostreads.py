"""The host-read trap: inside :func:`no_host_reads`, reading a tensor's value into Python (``.item()``,
``bool(t)``, ``.tolist()``, ``int(t)``, ``t.__index__``, ``.numpy()``) raises :class:`HostReadError`. On an
accelerator each of these is a device sync, so hot paths must never do one."""
from __future__ import annotations

import contextlib

import pytest
import torch

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


class HostReadError(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    def refuse(name):
        def read(self, *args, **kwargs):
            raise HostReadError(f"hot path called Tensor.{name}")
        return read

    with pytest.MonkeyPatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, refuse(name))
        yield
