"""Hand-written baseline: TenSEAL's encrypted-MNIST tutorial, on the high-level TenSEAL API only.

This is what a TenSEAL user writes by hand for ``models.mnist_tutorial.TutorialCNN``
(Conv2d(1, 4, 7, stride 3) -> square -> Linear(256, 64) -> square -> Linear(64, 10)):

* client: one context (N=8192, primes [31, 26 x 6, 31], scale 2^26, Galois keys for *all*
  steps, as the tutorial does) and ``ts.im2col_encoding`` of the 28x28 image;
* server: ``conv2d_im2col(kernel, windows_nb) + bias`` per output channel,
  ``CKKSVector.pack_vectors``, ``square_()``, ``mm(W1.T) + b1``, ``square_()``, ``mm(W2.T) + b2``.

TenSEAL issue 462 (``fresh_encryption + plain_list`` followed by ``.mm`` is wrong) does not
bite here: every plain bias is added to the *output* of a convolution or a ``mm`` (never to a
freshly encrypted vector before a ``mm``); ``tests/test_bench_tenseal_baseline.py`` checks the
logits against plaintext torch, and the benchmark checks them again on every image it runs.
"""

from __future__ import annotations

import numpy as np
import tenseal as ts
import torch
from torch import nn

from privml.errors import InvalidInput, UnsupportedModule

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = [31, 26, 26, 26, 26, 26, 26, 31]
SCALE_BITS = 26


class TenSEALTutorialCNN:
    """The tutorial's server-side network: the torch model's weights as plain Python lists."""

    def __init__(self, torch_model: nn.Module) -> None:
        conv = getattr(torch_model, "conv1", None)
        fc1 = getattr(torch_model, "fc1", None)
        fc2 = getattr(torch_model, "fc2", None)
        if not (isinstance(conv, nn.Conv2d) and isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
            raise UnsupportedModule(
                "TenSEALTutorialCNN needs a TutorialCNN-like model with conv1 (Conv2d), fc1 and fc2 (Linear)"
            )
        kh, kw = conv.kernel_size
        if (
            conv.in_channels != 1
            or kh != kw
            or conv.stride[0] != conv.stride[1]
            or conv.padding != (0, 0)
            or conv.bias is None
            or conv.dilation != (1, 1)
            or conv.groups != 1
        ):
            raise UnsupportedModule(
                "the im2col trick needs a 1-channel, square-kernel, equal-stride, unpadded, "
                "biased convolution"
            )
        self.kernel = kh
        self.stride = conv.stride[0]
        self.conv_weight = conv.weight.detach().double().reshape(conv.out_channels, kh, kw).tolist()
        self.conv_bias = conv.bias.detach().double().tolist()
        self.fc1_weight = fc1.weight.detach().double().T.tolist()
        self.fc1_bias = fc1.bias.detach().double().tolist()
        self.fc2_weight = fc2.weight.detach().double().T.tolist()
        self.fc2_bias = fc2.bias.detach().double().tolist()
        self.num_classes = fc2.out_features

    @staticmethod
    def make_context() -> ts.Context:
        """The tutorial's client context: secret key, relinearization keys and all-steps Galois keys."""
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, POLY_MODULUS_DEGREE, coeff_mod_bit_sizes=COEFF_MOD_BIT_SIZES)
        ctx.global_scale = 2.0**SCALE_BITS
        ctx.generate_galois_keys()
        return ctx

    def encrypt(self, ctx: ts.Context, image: torch.Tensor) -> tuple[ts.CKKSVector, int]:
        """im2col-encode and encrypt one image ((H, W), (1, H, W) or (1, 1, H, W)): (enc, windows_nb)."""
        if not isinstance(image, torch.Tensor) or not image.is_floating_point():
            raise InvalidInput("image must be a float torch.Tensor")
        img = image.detach().double().squeeze()
        if img.dim() != 2 or not torch.isfinite(img).all():
            raise InvalidInput(f"image must be one finite 2-D image, got shape {tuple(image.shape)}")
        return ts.im2col_encoding(ctx, img.tolist(), self.kernel, self.kernel, self.stride)

    def forward(self, enc: ts.CKKSVector, windows_nb: int) -> ts.CKKSVector:
        """The server's encrypted forward pass (needs only the public context)."""
        channels = [
            enc.conv2d_im2col(k, windows_nb) + b
            for k, b in zip(self.conv_weight, self.conv_bias, strict=True)
        ]
        x = ts.CKKSVector.pack_vectors(channels)
        x.square_()
        x = x.mm(self.fc1_weight) + self.fc1_bias
        x.square_()
        return x.mm(self.fc2_weight) + self.fc2_bias

    def decrypt(self, enc_out: ts.CKKSVector) -> torch.Tensor:
        """Client side: decrypt the logits (needs the secret key in the vector's context)."""
        return torch.from_numpy(np.asarray(enc_out.decrypt()[: self.num_classes], dtype=np.float64)).float()

    def __call__(self, ctx: ts.Context, image: torch.Tensor) -> torch.Tensor:
        """Encrypt, evaluate and decrypt one image: its logits, shape (num_classes,)."""
        return self.decrypt(self.forward(*self.encrypt(ctx, image)))
