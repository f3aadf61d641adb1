"""References between modules that are not parent/child, kept right under replication.

A few modules point at another module of the same model without owning it: a tied quantizer at the
quantizer whose factors it reuses, a conv trained folded with its BatchNorm at that BatchNorm (which
stays at its own path). They are plain attributes (not submodules), so the ``state_dict`` holds every
tensor once. ``copy.deepcopy`` and pickling map them to the copies; ``torch.nn.DataParallel`` does not:
its replicas copy each module's ``__dict__`` shallowly, so a replica would use the *original* module
(the wrong device, and in-place updates racing between threads).

:func:`bind_references` records every such reference as a pair of paths relative to the root and
registers a forward pre-hook on the root that, when the root is a replica (its recorded root is another
object), re-points each reference at the replica's own module. On the original model the hook is one
identity check.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

__all__ = ["bind_references", "module_references"]

_REFS, _ROOT, _HOOK = "_amct_refs", "_amct_refs_root", "_amct_refs_hook"


def module_references(root: nn.Module) -> list[tuple[str, str, str]]:
    """``(module path, attribute, target path)`` for every plain attribute holding a module of ``root``."""
    paths = {id(m): name for name, m in root.named_modules()}
    refs = []
    for name, m in root.named_modules():
        for attr, value in vars(m).items():
            if attr in (_REFS, _ROOT) or not isinstance(value, nn.Module) or value is m:
                continue
            if id(value) in paths:
                refs.append((name, attr, paths[id(value)]))
    return refs


def _rebind(root: nn.Module, args: Any) -> None:
    if root.__dict__.get(_ROOT) is root:
        return
    for path, attr, target in root.__dict__.get(_REFS, ()):
        root.get_submodule(path).__dict__[attr] = root.get_submodule(target)
    root.__dict__[_ROOT] = root


def bind_references(root: nn.Module) -> int:
    """Record ``root``'s cross references and keep them right in replicas; returns how many there are."""
    refs = module_references(root)
    root.__dict__[_REFS] = refs
    root.__dict__[_ROOT] = root
    if refs and not root.__dict__.get(_HOOK):
        root.register_forward_pre_hook(_rebind)
        root.__dict__[_HOOK] = True
    return len(refs)
