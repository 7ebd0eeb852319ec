"""Counts the reads that would make the host wait for the GPU, in a run on the CPU.

On a GPU, a value read back to Python (`.item()`, `bool(tensor)`, `.tolist()`) or an op whose output
size depends on the data (boolean-mask indexing, `nonzero`, `masked_select`, `unique`) blocks until
the device has caught up. On the CPU nothing blocks, so this mode tracks which tensors would live on
the device: the ones it is told about (parameters, the batch) and every tensor computed from one. A
read of such a tensor is counted with the line of this repository's code that made it; reads of
tensors built on the host (e.g. from a Python list) are not.
"""

import collections
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPOSITORY = Path(__file__).resolve().parents[1]
# ops that read a value back to the host, or whose output size depends on the values
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique2", "unique_dim"}


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path.is_relative_to(REPOSITORY) and ".venv" not in path.parts and path.parent.name != "tests":
            return f"{path.relative_to(REPOSITORY)}:{frame.lineno}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter(device_tensors) as counter: ...`; then `counter.syncs` (a Counter of
    `file:line`) and `counter.total`."""

    def __init__(self, device_tensors):
        super().__init__()
        # id -> tensor, held so that no id is reused while counting (a run of one step: small)
        self._device: dict[int, torch.Tensor] = {id(tensor): tensor for tensor in device_tensors}
        self.syncs: collections.Counter[str] = collections.Counter()
        self._tolist = None

    @property
    def total(self) -> int:
        return sum(self.syncs.values())

    def _on_device(self, values) -> bool:
        return any(isinstance(value, torch.Tensor) and id(value) in self._device for value in tree_flatten(values)[0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device = self._on_device((args, kwargs))
        name = func.overloadpacket.__name__
        boolean_index = name in {"index", "index_put", "index_put_"} and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in tree_flatten(args[1])[0])
        if on_device and (name in _SYNC_OPS or boolean_index):
            self.syncs[_caller()] += 1
        result = func(*args, **kwargs)
        if on_device:
            for value in tree_flatten(result)[0]:
                if isinstance(value, torch.Tensor):
                    self._device[id(value)] = value
        return result

    def __enter__(self):
        counter, original = self, torch.Tensor.tolist
        self._tolist = original

        def tolist(tensor):  # not dispatched: reads the data directly
            if id(tensor) in counter._device:
                counter.syncs[_caller()] += 1
            return original(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)
