"""Private tensor core: the PrivateTensor base and the op groups backends register."""

from privml.tensor.base import PrivateTensor, current_module, module_scope, op_name

__all__ = ["PrivateTensor", "current_module", "module_scope", "op_name"]
