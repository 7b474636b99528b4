"""Launch plumbing shared by the kernels: compiled on CUDA tensors, interpreted on CPU ones.

``triton.jit`` decides between the compiler and the interpreter once, when the kernel is
defined, from ``TRITON_INTERPRET``. That makes the result depend on import order (a CPU
test process that imported :mod:`kernels` before setting the variable could not run the
kernels at all). :class:`DualKernel` keeps both: tensors on a CUDA device go through the
compiled kernel (or through the interpreter when ``TRITON_INTERPRET=1``, as triton does),
tensors on the CPU always through the interpreter, whatever the variable said at import.

On CUDA, :class:`DualKernel` also shortens the launch: after the first launch of each
specialization (the argument dtypes, pointer alignments and integer classes Triton
specializes on, and the constexprs) it calls the compiled kernel's launcher directly,
skipping Triton's per-call binding and cache lookup (tens of microseconds of host time per
launch; a training step launches hundreds), and Triton's launch hooks where none is set.

Kernels wrapped this way must not call other ``@triton.jit`` functions (those would be
bound to one mode only, and ``tl.sum``, ``tl.sigmoid`` and the like are such functions);
they inline everything. The one exception is the combine function of ``tl.reduce`` built as
a ``JITFunction`` explicitly, which both modes accept (:data:`SUM`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = ["SUM", "DualKernel", "cdiv", "next_power_of_2", "check_same_device", "check_2d", "device_guard",
           "capture_launches", "compile_offline"]

_captured: list | None = None


def _add(a, b):
    return a + b


# tl.sum is a @triton.jit function, bound to the compiler or the interpreter at import, which a
# DualKernel cannot call. tl.reduce is a builtin; this combine function for it is always a
# JITFunction, which the compiler inlines and the interpreter calls as plain Python.
SUM = JITFunction(_add)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)``, as ``triton.cdiv``: that is a constexpr function, ~2 µs a host call, and a llama-1b
    training step computes ~1000 grid and block sizes."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 that is >= ``n`` (0 for 0), as ``triton.next_power_of_2``, at a plain call's cost."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


class DualKernel:
    """A Triton kernel runnable on CUDA tensors (compiled) and CPU tensors (interpreted)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.jitted = triton.jit(fn)  # an InterpretedFunction itself under TRITON_INTERPRET=1
        self._interpreted: InterpretedFunction | None = None
        self._compiled: dict[tuple, Any] = {}  # specialization -> compiled kernel (CUDA)

    def for_device(self, device: torch.device):
        if device.type == "cpu" and not isinstance(self.jitted, InterpretedFunction):
            if self._interpreted is None:
                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        return self.jitted

    def is_interpreted(self, device: torch.device) -> bool:
        """Whether launches on ``device`` go through the Triton interpreter."""
        return isinstance(self.for_device(device), InterpretedFunction)

    def launch(self, device: torch.device, grid: Sequence[int], *args: Any, **kwargs: Any) -> None:
        if _captured is not None:
            _captured.append((self, tuple(grid), args, kwargs))
            return
        fn = self.for_device(device)
        if isinstance(fn, InterpretedFunction):
            fn[tuple(grid)](*args, **kwargs)
            return
        current = torch.cuda.current_device()
        index = device.index if device.index is not None else current
        key = _launch_key(index, args, kwargs)
        hit = self._compiled.get(key)
        if hit is not None and current == index:  # as triton's JITFunction.run launches
            compiled, names = hit
            values = (*args, *map(kwargs.__getitem__, names))  # every parameter, in order
            gx, gy, gz = (*grid, 1, 1)[:3]
            stream = torch._C._cuda_getCurrentRawStream(index)
            enter_hook, exit_hook = _hook(knobs.runtime.launch_enter_hook), _hook(knobs.runtime.launch_exit_hook)
            metadata = None if enter_hook is None else compiled.launch_metadata(grid, stream, *values)
            compiled.run(gx, gy, gz, stream, compiled.function, compiled.packed_metadata, metadata,
                         enter_hook, exit_hook, *values)
            return
        with device_guard(device):
            self._compiled[key] = (fn[tuple(grid)](*args, **kwargs), tuple(fn.arg_names[len(args):]))


def _launch_key(index: int, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """What Triton compiles a launch for, with the device: each tensor's dtype and 16-byte alignment,
    each integer's width class and whether it is 1 or a multiple of 16, a float's type, a tensor
    descriptor's element type and block shape, and the constexprs. One loop, not a call per argument:
    a training step launches hundreds of kernels."""
    key: list = [index]
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key.append((arg.dtype, arg.data_ptr() % 16 == 0))
        elif type(arg) is int:
            width = 32 if -0x80000000 <= arg < 0x80000000 else 64 if -(1 << 63) <= arg < 1 << 63 else 65
            key.append((width, arg == 1, arg % 16 == 0))
        elif arg is None or type(arg) is bool:
            key.append(arg)
        elif isinstance(arg, TensorDescriptor):  # specialized on its element type and block shape
            key.append((arg.base.dtype, tuple(arg.block_shape), arg.padding))
        else:
            key.append(type(arg))
    key.extend(kwargs.items())
    return tuple(key)


def _hook(hook: Any) -> Any:
    """A Triton launch hook, or None when it calls nothing: Triton 3.6 keeps an empty ``HookChain``
    where none is set, and calling it and building the launch metadata it would receive costs each
    launch a few microseconds of host time for nothing."""
    return None if hook is None or not getattr(hook, "calls", True) else hook


def device_guard(device: torch.device):
    """Make ``device`` current for the launch (triton launches on the current CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_same_device(what: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    device = ref.device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{what}: {name} is on {t.device} but the other operands are on {device}")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"{what}: runs on CUDA tensors (or CPU tensors through the Triton interpreter), "
                         f"not on {device}")


def check_2d(what: str, name: str, t: torch.Tensor, shape: tuple[int, int] | None = None,
             dtypes: Sequence[torch.dtype] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{what}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{what}: {name} must be of dtype {names}, got {str(t.dtype).replace('torch.', '')}")


@contextlib.contextmanager
def capture_launches():
    """Record ``(kernel, grid, args, kwargs)`` of every launch instead of running it (for :func:`compile_offline`)."""
    global _captured
    previous, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = previous


def compile_offline(kernel: DualKernel, args: Sequence[Any], kwargs: dict[str, Any], arch: int = 90):
    """Compile a captured launch for ``sm_<arch>`` down to a cubin, without a GPU.

    Specializes the arguments exactly as a real launch would (ints equal to 1, 16-byte
    alignment and divisibility), so the TTGIR/PTX it returns is what the GPU would run.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = JITFunction(kernel.fn)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
