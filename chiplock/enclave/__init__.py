"""Secure-world executor: partitioned models whose secure part runs in a hardened, isolated process."""
