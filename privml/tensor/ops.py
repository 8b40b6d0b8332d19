"""Named groups of torch entry points that mean the same operation.

A user reaches one operation through several doors (``x + y``, ``torch.add``,
``x.add_``); backends register a whole group at once so none is missed.
In-place variants are included on purpose: private tensors never mutate, the
handler returns a new tensor and Python rebinds the name (``out += identity``
in a residual block works; aliasing through another reference does not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from privml import functional as PF

T = torch.Tensor

LINEAR = [F.linear]
CONV2D = [F.conv2d]
AVG_POOL2D = [F.avg_pool2d]
ADAPTIVE_AVG_POOL2D = [F.adaptive_avg_pool2d]
MAX_POOL2D = [F.max_pool2d]
BATCH_NORM = [F.batch_norm]
DROPOUT = [F.dropout, F.dropout1d, F.dropout2d]

ADD = [torch.add, T.add, T.__add__, T.__radd__, T.add_, T.__iadd__]
SUB = [torch.sub, T.sub, T.__sub__, T.__rsub__, T.sub_, T.__isub__]
MUL = [torch.mul, T.mul, T.__mul__, T.__rmul__, T.mul_, T.__imul__]
DIV = [torch.div, T.div, T.__truediv__, T.div_, T.__itruediv__]
NEG = [torch.neg, T.neg, T.__neg__]
MATMUL = [torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__, torch.mm, T.mm]
SQUARE = [torch.square, T.square]
POW = [torch.pow, T.pow, T.__pow__]
SUM = [torch.sum, T.sum]
MEAN = [torch.mean, T.mean]
CAT = [torch.cat, torch.concat]

FLATTEN = [torch.flatten, T.flatten]
RESHAPE = [torch.reshape, T.reshape, T.view]
IDENTITY = [T.contiguous, T.detach, T.clone, T.float]

RELU = [F.relu, torch.relu, T.relu, F.relu_, torch.relu_, T.relu_]
LEAKY_RELU = [F.leaky_relu]
GELU = [F.gelu]
SILU = [F.silu]
SIGMOID = [torch.sigmoid, T.sigmoid, F.sigmoid]
TANH = [torch.tanh, T.tanh, F.tanh]
SOFTPLUS = [F.softplus]
SOFTMAX = [F.softmax, torch.softmax, T.softmax]
POLYVAL = [PF.polyval]

ACTIVATIONS = {"relu": RELU, "leaky_relu": LEAKY_RELU, "gelu": GELU, "silu": SILU, "sigmoid": SIGMOID,
               "tanh": TANH, "softplus": SOFTPLUS}
