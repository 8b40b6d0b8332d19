"""The hand-written TenSEAL baseline (experiments/bench/tenseal_tutorial.py) gives the torch model's logits.

Real TenSEAL ciphertexts; the server side runs on a context deserialized without the secret key.
Tolerance: |encrypted - torch| <= 0.05 + 5% of max |logit|. The tutorial's parameters (scale 2^26, 31-bit
special prime) are noisy: one rescale alone costs ~1e-3, a 49-term convolution ~3e-2, and logits of ~5 come
out ~0.2 off (measured); a wrong weight, order or bias gives errors of order 1.
"""

from __future__ import annotations

import pytest
import tenseal as ts
import torch
from torch import nn

from experiments.bench.tenseal_tutorial import TenSEALTutorialCNN
from models.mnist_tutorial import TutorialCNN
from privml.errors import InvalidInput, UnsupportedModule

TOL_ABS, TOL_REL = 0.05, 0.05


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, TenSEALTutorialCNN, ts.Context, torch.Tensor]:
    torch.manual_seed(0)
    model = TutorialCNN().eval()
    with torch.no_grad():  # larger logits than the default init, like a trained model's (|logit| up to ~5)
        model.fc1.weight.mul_(4.0)
        model.fc2.weight.mul_(10.0)
        model.fc2.bias.copy_(torch.linspace(-2.0, 2.0, 10))
    images = torch.rand(2, 1, 28, 28)
    return model, TenSEALTutorialCNN(model), TenSEALTutorialCNN.make_context(), images


def test_logits_match_torch(setup) -> None:
    model, enc_model, ctx, images = setup
    with torch.no_grad():
        ref = model(images)
    assert ref.abs().max() > 2.0  # the check is not vacuous
    for i in range(len(images)):
        got = enc_model(ctx, images[i])
        tol = TOL_ABS + TOL_REL * ref[i].abs().max().item()
        assert got.shape == (10,)
        assert (got - ref[i]).abs().max().item() <= tol, (got, ref[i])
        top2 = ref[i].topk(2).values
        if top2[0] - top2[1] > 2 * tol:
            assert got.argmax() == ref[i].argmax()


def test_server_runs_on_public_context(setup) -> None:
    """Client/server split as deployed: the server holds a context without the secret key."""
    model, enc_model, ctx, images = setup
    public = ts.context_from(ctx.serialize(save_secret_key=False))
    assert not public.has_secret_key() and public.has_galois_keys()
    enc, windows_nb = enc_model.encrypt(ctx, images[0])
    server_in = ts.ckks_vector_from(public, enc.serialize())
    response = enc_model.forward(server_in, windows_nb).serialize()
    got = enc_model.decrypt(ts.ckks_vector_from(ctx, response))
    with torch.no_grad():
        ref = model(images[:1])[0]
    assert (got - ref).abs().max().item() <= TOL_ABS + TOL_REL * ref.abs().max().item()


def test_rejects_bad_inputs(setup) -> None:
    _, enc_model, ctx, _ = setup
    with pytest.raises(InvalidInput):
        enc_model.encrypt(ctx, torch.zeros(2, 28, 28))
    with pytest.raises(InvalidInput):
        enc_model.encrypt(ctx, torch.zeros(28, 28, dtype=torch.int64))
    with pytest.raises(InvalidInput):
        enc_model.encrypt(ctx, torch.full((28, 28), float("nan")))
    with pytest.raises(UnsupportedModule):
        TenSEALTutorialCNN(nn.Linear(3, 3))
    bad = TutorialCNN()
    bad.conv1 = nn.Conv2d(1, 4, 7, stride=3, padding=1)
    with pytest.raises(UnsupportedModule):
        TenSEALTutorialCNN(bad)
