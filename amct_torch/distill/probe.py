"""Running a model up to one block and no further: hooks that read, replace and stop.

A :class:`BlockProbe` is a context manager over one model and one block boundary (``start``, ``end``:
module paths). While it is active:

* the forward pre-hook on ``start`` records the block's input (the first tensor argument of the first
  call of ``start``) and may replace it (``substitute``: the teacher's input for the student);
* the forward hook on ``end`` fires at the first call of ``end`` *after* ``start`` began (so an
  activation module that the model calls in several places ends the right group), and either records
  the output or raises a private exception carrying it, so the layers after the block are not computed.

:func:`run_to_end` calls the model and returns the block output. Helpers turn batches into model inputs
(:func:`model_inputs`), find the main tensor of an output (:func:`primary`: the first tensor of a tuple
or of a transformers ``ModelOutput``) and move nested inputs between devices (:func:`to_device`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["BlockProbe", "StopForward", "run_to_end", "primary", "replace_primary", "model_inputs",
           "default_input", "to_device", "model_device", "InputFn"]

#: ``input_fn(batch) -> model input``: a tensor, a tuple/list of positional inputs or a dict of keyword inputs
InputFn = Callable[[Any], Any]


class StopForward(Exception):
    """Raised by a probe's end hook to leave the forward early; carries the block output."""

    def __init__(self, output: Any):
        super().__init__("block end reached")
        self.output = output


def primary(obj: Any) -> torch.Tensor | None:
    """The main tensor of a module input or output: the tensor itself, or the first tensor found in a
    tuple/list (depth first) or a mapping (``ModelOutput``, in its key order)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            t = primary(item)
            if t is not None:
                return t
        return None
    if isinstance(obj, dict) or hasattr(obj, "to_tuple"):
        for value in (obj.values() if isinstance(obj, dict) else obj.to_tuple()):
            t = primary(value)
            if t is not None:
                return t
    return None


def replace_primary(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with their first tensor argument (positional first, then keyword) replaced by ``new``."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return args[:i] + (new,) + args[i + 1:], kwargs
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return args, {**kwargs, key: new}
    raise ValueError("the block's start module takes no tensor argument whose value could be replaced")


def default_input(batch: Any) -> Any:
    """The model input of a batch when no ``input_fn`` is given: a tensor as it is, a dict as keyword
    inputs, the first element of an ``(x, y)`` tuple or list (AMCT's ``ModelSingleTensorInput``)."""
    if isinstance(batch, (torch.Tensor, dict)):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty batch (); pass input_fn= to say what the model input of a batch is")
        return batch[0]
    raise TypeError(f"a batch of type {type(batch).__name__} has no default model input (allowed: a tensor, "
                    "an (x, y) tuple or list, a dict of keyword inputs); pass input_fn=batch -> model input")


def model_inputs(batch: Any, input_fn: InputFn | None = None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)`` from one batch."""
    x = default_input(batch) if input_fn is None else input_fn(batch)
    if isinstance(x, dict):
        return (), dict(x)
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    return (x,), {}


def to_device(obj: Any, device: torch.device | None) -> Any:
    """``obj`` with every tensor in it (nested tuples, lists, dicts) moved to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (``None`` for a model without any)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


class BlockProbe:
    """Hooks on ``model`` that read (and optionally replace) a block's input and stop at its output.

    Args:
        model: the model (teacher or student).
        start, end: module paths; the block's input is ``start``'s first tensor argument, its output
            ``end``'s output (the first call of ``end`` after ``start`` began).
        capture_input: keep the input (detached) in :attr:`input`.
        substitute: ``f(input) -> tensor or None``: the tensor ``start`` receives instead (None: keep).
        stop: leave the forward at the end (raise :class:`StopForward`); otherwise record :attr:`output`.
        name: the block's name, for errors.
    """

    def __init__(self, model: nn.Module, start: str, end: str, *, capture_input: bool = False,
                 substitute: Callable[[torch.Tensor], torch.Tensor | None] | None = None, stop: bool = True,
                 name: str = ""):
        self.model, self.start, self.end, self.name = model, start, end, name or f"{start}..{end}"
        self.capture_input, self.substitute, self.stop = capture_input, substitute, stop
        self._handles: list[Any] = []
        self.reset()

    def reset(self) -> None:
        """Forget what the last forward recorded (call before each forward)."""
        self.started = False
        self.done = False
        self.input: torch.Tensor | None = None
        self.output: Any = None
        self.substituted = False

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.started:
            return None
        self.started = True
        x = primary((args, kwargs))
        if x is None:
            raise ValueError(f"block {self.name!r}: its start module {self.start!r} got no tensor input")
        if self.capture_input:
            self.input = x.detach()
        if self.substitute is not None:
            new = self.substitute(x)
            if new is not None:
                if new.shape != x.shape:
                    raise ValueError(f"block {self.name!r}: the replacement input of {self.start!r} has shape "
                                     f"{tuple(new.shape)}, the student's own input {tuple(x.shape)}")
                self.substituted = True
                return replace_primary(args, kwargs, new.to(device=x.device, dtype=x.dtype))
        return None

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.started or self.done:
            return
        self.done = True
        if self.stop:
            raise StopForward(output)
        self.output = output

    def __enter__(self) -> "BlockProbe":
        try:
            start = self.model.get_submodule(self.start)
            end = self.model.get_submodule(self.end)
        except AttributeError as err:
            raise ValueError(f"block {self.name!r}: {err}") from None
        self.reset()
        self._handles = [start.register_forward_pre_hook(self._pre, with_kwargs=True),
                         end.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def run_to_end(model: nn.Module, inputs: tuple[tuple, dict], probe: BlockProbe) -> Any:
    """Run ``model`` on ``inputs`` with ``probe`` active (entered by the caller) and return the block output."""
    args, kwargs = inputs
    probe.reset()
    try:
        model(*args, **kwargs)
    except StopForward as stop:
        return stop.output
    if not probe.done:
        what = "was not called" if not probe.started else f"was not called after {probe.start!r}"
        raise RuntimeError(f"block {probe.name!r}: its end module {probe.end!r} {what} in the forward; "
                           "check the block boundaries (start and end are module paths called in that order)")
    return probe.output
