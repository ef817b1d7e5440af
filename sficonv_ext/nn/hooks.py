"""Whether a module's output may be seen by code outside the network."""
import torch.nn as nn

_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def hooked(module):
    """Whether a hook (the module's own or a global one) sees ``module`` run. A forward hook
    may keep the output, and a full backward hook hands on a view of it: either way the
    caller must not write over that output in place."""
    own = (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
           or getattr(module, "_backward_pre_hooks", None))
    return bool(own or any(getattr(nn.modules.module, name, None) for name in _GLOBAL_HOOKS))
