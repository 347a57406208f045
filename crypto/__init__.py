"""fedbus.crypto: the cryptographic primitives of secure aggregation (numpy + cryptography).

Modules: agreement (X25519 + HKDF-SHA256), aead (AES-256-GCM), signing (Ed25519), shamir
(t-of-n over GF(2^31 - 1), vectorised), prg (AES-256-CTR masks), quantize (fixed point in
Z_2^32). Import the submodules directly; this package imports nothing heavy.
"""
