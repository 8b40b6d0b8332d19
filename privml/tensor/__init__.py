"""Private tensor core: the PrivateTensor base, module scopes for errors, in-place forms."""

from privml.tensor.base import PrivateTensor, current_module, module_scope, op_name
from privml.tensor.ops import is_inplace, out_of_place

__all__ = ["PrivateTensor", "current_module", "is_inplace", "module_scope", "op_name", "out_of_place"]
