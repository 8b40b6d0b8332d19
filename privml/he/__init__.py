"""CKKS protocol maths on TenSEAL's raw SEAL bindings, apart from the tensor API.

* :mod:`privml.he.params` - parameter choice within the 128-bit HE standard;
* :mod:`privml.he.sealio` - the one TenSEAL import; SEAL objects <-> bytes;
* :mod:`privml.he.keys` - SEAL context for a parameter set, key generation, the keys a party holds;
* :mod:`privml.he.chain` - the modulus chain: per-level primes, bit counts and canonical scales;
* :mod:`privml.he.encoder` - encoding at exact per-level scales, cache of constant plaintexts;
* :mod:`privml.he.context` - :class:`CKKSContext`, the guarded evaluator (level/scale checks, op counters);
* :mod:`privml.he.kernels` - BSGS diagonal mat-vec, polynomial evaluation, throughput dense layer;
* :mod:`privml.he.expansion` - client-side input expansion for the first layer;
* :mod:`privml.he.serialize` - versioned, checked binary formats for contexts and ciphertexts.

Submodules import TenSEAL on first use, so ``import privml.he`` stays cheap.
"""
