"""Official test vectors: the primitives compute the standardised functions, bit for bit."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from crypto import aead, agreement, prg, signing

H = bytes.fromhex


# RFC 7748, section 5.2 (scalar multiplication) and section 6.1 (Diffie-Hellman).
def test_x25519_rfc7748_section_6_1_key_agreement() -> None:
    alice_priv = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    alice_pub = H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    bob_priv = H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    bob_pub = H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert agreement.agreement_public_key(alice_priv) == alice_pub
    assert agreement.agreement_public_key(bob_priv) == bob_pub
    # agree() = HKDF-SHA256(X25519 output): both sides and the RFC shared secret agree.
    expected = agreement.hkdf_sha256(shared, info=b"fedbus test")
    assert agreement.agree(alice_priv, bob_pub, info=b"fedbus test") == expected
    assert agreement.agree(bob_priv, alice_pub, info=b"fedbus test") == expected


def test_x25519_rfc7748_section_5_2_scalar_multiplication() -> None:
    scalar = H("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = H("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    out = H("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")
    assert agreement.agree(scalar, u, info=b"x") == agreement.hkdf_sha256(out, info=b"x")


# RFC 5869, appendix A.1 (test case 1) and A.3 (test case 3: empty salt and info).
def test_hkdf_sha256_rfc5869_case_1() -> None:
    okm = agreement.hkdf_sha256(
        H("0b" * 22),
        salt=H("000102030405060708090a0b0c"),
        info=H("f0f1f2f3f4f5f6f7f8f9"),
        length=42,
    )
    assert okm == H(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_sha256_rfc5869_case_3() -> None:
    okm = agreement.hkdf_sha256(H("0b" * 22), salt=b"", info=b"", length=42)
    assert okm == H(
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )
    # No salt means a zero salt of hash length (RFC 5869 section 2.2): same result.
    assert agreement.hkdf_sha256(H("0b" * 22), info=b"", length=42) == okm


# RFC 8032, section 7.1, TEST 1 and TEST 2.
ED25519_VECTORS = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
]


def test_ed25519_rfc8032_vectors() -> None:
    for secret, public, message, signature in ED25519_VECTORS:
        assert signing.signing_public_key(H(secret)) == H(public)
        assert signing.sign(H(secret), H(message)) == H(signature)
        signing.verify(H(public), H(message), H(signature))


# The Galois/Counter Mode spec (McGrew & Viega, as used in NIST's GCM validation), test case
# 16: AES-256, 60-byte plaintext, 20-byte AAD, 96-bit IV.
def test_aes256_gcm_test_case_16() -> None:
    key = H("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
    iv = H("cafebabefacedbaddecaf888")
    plaintext = H(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
        "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
    )
    ad = H("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    ciphertext = H(
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
    )
    tag = H("76fc6ece0f4e1768cddf8853bb2d551b")
    sealed = aead.encrypt(key, plaintext, ad, randbytes=lambda n: iv)
    assert sealed == iv + ciphertext + tag
    assert aead.decrypt(key, sealed, ad) == plaintext


# NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt: four blocks, the counter block crossing a
# byte boundary (...feff -> ...ff00), which pins down the big-endian 128-bit increment.
SP800_38A_KEY = H("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
SP800_38A_PLAINTEXT = H(
    "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
)


def test_prg_keystream_is_aes256_ctr_of_sp800_38a() -> None:
    counter = H("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    expected = H(
        "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
        "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6"
    )
    stream = prg.keystream(SP800_38A_KEY, 64, initial_counter=counter)
    assert bytes(a ^ b for a, b in zip(stream, SP800_38A_PLAINTEXT, strict=True)) == expected


def test_prg_mask_is_little_endian_words_of_ctr_keystream_from_zero() -> None:
    # SP 800-38A F.1.5 ECB-AES256: the block function itself.
    ecb = Cipher(algorithms.AES(SP800_38A_KEY), modes.ECB()).encryptor()
    assert ecb.update(SP800_38A_PLAINTEXT[:16]) == H("f3eed1bdb5d2a03c064b5a7e3db181f8")
    # The mask definition: block i of the keystream is AES(seed, i as 128-bit big-endian).
    blocks = b"".join(ecb.update(i.to_bytes(16, "big")) for i in range(300))
    mask = prg.expand_mask(SP800_38A_KEY, 1200)
    assert mask.dtype == np.uint32
    assert np.array_equal(mask, np.frombuffer(blocks, dtype="<u4"))
    assert prg.keystream(SP800_38A_KEY, 4800) == blocks
