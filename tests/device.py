"""A device that is not the CPU's, on a machine that has only a CPU: the check CI runs for the code
written for CUDA.

Inside :class:`FakeDevice`, a tensor put on the ``meta`` device (``torch.zeros(..., device="meta")``,
``x.to("meta")``, a module's ``.to("meta")``) is a CPU tensor that reports ``meta`` as its device
(:class:`OnDevice`). Every operation is run on the CPU data, so results are the CPU's exactly and
data-dependent code (``nonzero``, ``tolist``, early stops) runs as it does on a GPU, but first its
tensors' devices are checked as CUDA checks them: an operation that mixes a device tensor with a
CPU tensor of one or more dimensions raises, as ``index_copy`` with a CPU index raises on CUDA. CPU
scalars (0-d tensors) may join device tensors, and indexing may take CPU indices, as on CUDA.

It also counts the traffic that makes a GPU wait for the host or the host for the GPU
(:class:`Traffic`): reads (``item``, ``tolist``, ``nonzero``, copies to the CPU) and uploads
(copies from the CPU, ``torch.tensor(..., device=...)``, CPU indices).

Why not the alternatives: the plain ``meta`` device has no data, so it cannot run the
data-dependent parts (an early stop, an item leaving a batch) and gives no results to compare;
``FakeTensorMode`` has the same limit and a CPU-only PyTorch build refuses ``device="cuda"`` in
``torch.tensor``. Here the whole engine runs unchanged, at the CPU's speed plus one Python call
per operation (the tiny model: seconds).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from models.diffusion.components import ModelBundle

DEVICE = torch.device("meta")

aten = torch.ops.aten
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
"""Operations that take indices on the CPU for a tensor on the device (copying them there)."""
READS = {aten._local_scalar_dense.default, aten.nonzero.default}
"""Operations whose result the host must wait for."""


class OnDevice(torch.Tensor):
    """A CPU tensor (``elem``) that reports :data:`DEVICE` as its device."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnDevice:
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=DEVICE,
            requires_grad=False,
        )
        wrapper.elem = elem
        return wrapper

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: a device tensor was used outside FakeDevice")


@dataclass
class Traffic:
    """Reads and uploads between host and device, by the operation that made them."""

    reads: Counter = field(default_factory=Counter)
    uploads: Counter = field(default_factory=Counter)

    def snapshot(self) -> tuple[int, int]:
        """(reads, uploads) so far."""
        return sum(self.reads.values()), sum(self.uploads.values())


class DeviceMixError(RuntimeError):
    """An operation CUDA would refuse: device and CPU tensors mixed."""


def _on_device(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


def _tensors(values) -> list[torch.Tensor]:
    """The tensors among an operation's arguments (ATen nests them one level deep at most)."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _unwrap(value):
    if isinstance(value, OnDevice):
        return value.elem
    if isinstance(value, list | tuple):
        return type(value)(v.elem if isinstance(v, OnDevice) else v for v in value)
    return value


def _wrap(value):
    if isinstance(value, torch.Tensor) and not isinstance(value, OnDevice):
        return OnDevice(value)
    if isinstance(value, list | tuple):
        return type(value)(_wrap(v) for v in value)
    return value


def _index_tensor(index):
    """A Python list index as the CPU tensor CUDA would copy to the device."""
    if isinstance(index, list):
        return torch.tensor(index, dtype=None if index and isinstance(index[0], bool) else torch.long)
    return index


class _Functions(TorchFunctionMode):
    """The calls that never reach the dispatcher as a device operation."""

    def __init__(self, traffic: Traffic) -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], OnDevice):
            self.traffic.reads["tolist"] += 1
            return args[0].elem.tolist()
        if func is torch.Tensor.numpy and isinstance(args[0], OnDevice):
            raise TypeError("can't convert a device tensor to numpy: copy it to the CPU first")
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], OnDevice):
            # PyTorch makes a list index into a tensor on the indexed tensor's device itself: here,
            # a tensor without data. On the CPU first, it is an index the operation copies.
            index = args[1]
            if isinstance(index, tuple):
                index = tuple(_index_tensor(i) for i in index)
            return func(args[0], _index_tensor(index), *args[2:], **kwargs)
        if func in (torch.tensor, torch.as_tensor) and _on_device(kwargs.get("device")):
            self.traffic.uploads[func.__name__] += 1
            return OnDevice(func(*args, **{**kwargs, "device": "cpu"}))
        return func(*args, **kwargs)


class _Operations(TorchDispatchMode):
    """Every ATen operation: devices checked as CUDA checks them, run on the CPU data, traffic counted."""

    def __init__(self, traffic: Traffic) -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors((*args, *kwargs.values()))
        if any(t.device.type == DEVICE.type and not isinstance(t, OnDevice) for t in tensors):
            raise RuntimeError(f"{func}: a tensor was made on the device outside FakeDevice")
        on_device = any(isinstance(t, OnDevice) for t in tensors)
        host = [t for t in tensors if not isinstance(t, OnDevice) and t.dim() > 0]
        to_device = _on_device(kwargs.get("device"))
        name = str(func.overloadpacket.__name__)
        if on_device and host:
            if func in INDEXING:
                self.traffic.uploads[name] += len(host)
            elif func is aten.copy_.default:
                pass  # a copy between the two, counted below
            else:
                raise DeviceMixError(
                    f"{func}: expected all tensors to be on the same device, but found at least two "
                    f"devices, {DEVICE.type} and cpu"
                )
        if func is aten.copy_.default:
            destination, source = args[0], args[1]
            if isinstance(destination, OnDevice) and not isinstance(source, OnDevice):
                self.traffic.uploads[name] += 1
            elif isinstance(source, OnDevice) and not isinstance(destination, OnDevice):
                self.traffic.reads[name] += 1
            func(_unwrap(destination), _unwrap(source), *args[2:], **kwargs)
            return destination
        if func in READS and on_device:
            self.traffic.reads[name] += 1
        leaves_device = on_device and kwargs.get("device") is not None and not to_device
        if leaves_device:
            self.traffic.reads[name] += 1
        elif to_device and tensors and not on_device:
            self.traffic.uploads[name] += 1
        if to_device:
            kwargs = {**kwargs, "device": "cpu"}
        out = func(*(_unwrap(a) for a in args), **{k: _unwrap(v) for k, v in kwargs.items()})
        if func._schema.is_mutable and args and isinstance(args[0], OnDevice):
            return args[0]
        if leaves_device or not (on_device or to_device):
            return out
        return _wrap(out)


class FakeDevice:
    """``with FakeDevice() as traffic:`` runs the block with the fake device and counts its traffic."""

    def __init__(self) -> None:
        self.traffic = Traffic()
        self._modes = (_Functions(self.traffic), _Operations(self.traffic))
        self._overwrite = False

    def __enter__(self) -> Traffic:
        # a module's .to() replaces its parameters rather than setting their .data, which would
        # change a wrapper's dtype or device but not the tensor it wraps
        self._overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        for mode in self._modes:
            mode.__enter__()
        return self.traffic

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        torch.__future__.set_overwrite_module_params_on_conversion(self._overwrite)


def on_device(bundle: ModelBundle) -> ModelBundle:
    """A copy of ``bundle`` whose models live on the fake device; call inside :class:`FakeDevice`."""
    moved = copy.deepcopy(bundle)
    for module in (moved.unet, moved.vae, moved.text_encoder, moved.clip.model):
        module.to(DEVICE)
    return replace(moved, device=DEVICE)


def to_host(value):
    """Device tensors (nested in lists, tuples, dicts) copied to the CPU; call inside :class:`FakeDevice`."""
    return tree_map(lambda t: t.cpu() if isinstance(t, OnDevice) else t, value)
