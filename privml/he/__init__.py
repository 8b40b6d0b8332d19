"""CKKS protocol maths on TenSEAL's raw SEAL bindings, apart from the tensor API.

* :mod:`privml.he.params` - parameter choice within the 128-bit HE standard;
* :mod:`privml.he.context` - keys, encoding and guarded evaluation (:class:`CKKSContext`);
* :mod:`privml.he.kernels` - BSGS diagonal mat-vec, polynomial evaluation, throughput dense layer;
* :mod:`privml.he.serialize` - versioned, checked binary formats for contexts and ciphertexts.

Submodules import TenSEAL on first use, so ``import privml.he`` stays cheap.
"""
