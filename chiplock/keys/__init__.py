"""Keys (expert layer): Argon2id stretching, HKDF sub-keys; fuzzy extraction lives beside them."""

from chiplock.keys.kdf import INSECURE_FAST, KdfParams, MasterKDF, assemble_material, subkey

__all__ = ["INSECURE_FAST", "KdfParams", "MasterKDF", "assemble_material", "subkey"]
