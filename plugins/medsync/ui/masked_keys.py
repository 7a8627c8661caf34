"""Source keys that identify a patient, as the medsync page shows them: masked.

A PACS keys its subjects by PatientID, the hospital's MRN (``Source.keys_identify_patients``),
and the page shows no MRN. Such a key is shown as ``patient#`` and 12 hex digits of an
HMAC-SHA256 of the source, the level and the key. Keyed, because MRNs are short: an unkeyed
hash of every possible MRN is a lookup table back to the patient. The same patient gets the
same token everywhere on the page (the quarantine entry, the studies waiting for it, a search),
so people can still tell that two rows are the same patient.

The key is derived from Airflow's ``[api] secret_key``, which every API server of one Airflow
shares (Airflow requires it); without one, from random bytes (tokens then differ between
processes, and still reveal nothing).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from functools import cache

MASK_PREFIX = "patient#"
MASK_HEX_DIGITS = 12
"""48 bits: no two patients of one source share a token in practice, and the token is short."""


@cache
def _mask_key() -> bytes:
    from airflow.configuration import conf

    secret = conf.get("api", "secret_key", fallback="") or secrets.token_hex(32)
    # Derived, not the secret itself: a token can never help anyone guess the API server's key.
    return hmac.new(secret.encode(), b"medsync.ui masked patient keys", hashlib.sha256).digest()


def mask_patient_key(source: str, level: str, key: str) -> str:
    """The token the page shows for ``key``, a source key that identifies a patient."""
    message = "\x00".join((source, level, key)).encode()
    return MASK_PREFIX + hmac.new(_mask_key(), message, hashlib.sha256).hexdigest()[:MASK_HEX_DIGITS]
