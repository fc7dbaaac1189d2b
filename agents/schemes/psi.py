"""Entity alignment by private set intersection (PSI): Diffie-Hellman PSI over Curve25519, simulated for real.

Meadows (1986) / Huberman, Franklin & Hogg (1999), "Enhancing privacy and trust in electronic
communities", in its elliptic-curve form (Ion et al., "On Deploying Secure Computing: Private
Intersection-Sum-with-Cardinality", EuroS&P 2020). Each party hashes its identifiers onto the curve and
blinds them with a secret scalar; blinding is commutative, X25519(a, X25519(b, H(id))) ==
X25519(b, X25519(a, H(id))), so doubly blinded values match exactly when the identifiers do, and
nothing that crosses shows an identifier in the clear:

1. the label holder L sends its blinded set H(l)^a;
2. the other party P sends back L's set blinded again, in the order received, H(l)^ab, and its own blinded
   set H(p)^b, shuffled;
3. L blinds P's set, H(p)^ba, and matches: it learns which of its entities P holds, and P nothing;
4. L sends P, for each aligned entity in the order training will use, the position of that entity in P's
   shuffled message (4-byte integers, not identifiers), which P maps back through its shuffle.

With several parties L runs this with each one and keeps the entities all of them hold. The messages are
returned as arrays, so the ledger books the bytes that really cross and tests can look inside them. The
secret scalars come from the run's seed (a simulation: same seed, same messages). Pure functions, no Ray.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

POINT = 32  # bytes of a Curve25519 u-coordinate: one blinded identifier
POSITION = 4  # bytes of one position in step 4 (int32)
PSI_STREAM = 0x9510


@dataclass(frozen=True)
class Message:
    """What crossed in one step: sender, receiver and the bytes themselves."""

    sender: str
    receiver: str
    payload: np.ndarray  # uint8 (items, bytes per item)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        return int(self.payload.nbytes)


@dataclass(frozen=True)
class Alignment:
    """The intersection: for each party, the row of its own view holding each aligned entity (the same order for
    all), and every message that crossed."""

    rows: dict[str, np.ndarray]  # party -> int64 positions in its own id list
    messages: tuple[Message, ...]

    def bytes_of(self, party: str) -> tuple[int, int]:
        """(bytes the party sent, bytes it received)."""
        sent = sum(m.nbytes for m in self.messages if m.sender == party)
        return sent, sum(m.nbytes for m in self.messages if m.receiver == party)


def _secret(seed: int, index: int) -> bytes:
    """A party's secret scalar (X25519 clamps it), from its own stream."""
    return np.random.default_rng([int(seed), PSI_STREAM, int(index)]).bytes(32)


def _hash(ids: Sequence[str]) -> list[bytes]:
    """Each identifier hashed to 32 bytes, read as a u-coordinate (a point of the curve or of its twist: X25519
    multiplies either, and the commutativity the protocol needs holds on both)."""
    return [hashlib.sha256(b"collabsim-psi\x00" + str(i).encode()).digest() for i in ids]


def _blind(secret: bytes, points: Sequence[bytes]) -> list[bytes]:
    """Each point multiplied by the secret scalar (X25519)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    key = X25519PrivateKey.from_private_bytes(secret)
    return [key.exchange(X25519PublicKey.from_public_bytes(p)) for p in points]


def _array(points: Sequence[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(points), dtype=np.uint8).reshape(len(points), POINT) if points else \
        np.zeros((0, POINT), dtype=np.uint8)


def align(ids: dict[str, np.ndarray], holder: str, seed: int) -> Alignment:
    """Intersect every party's identifiers with the label holder's by DH-PSI; the aligned entities keep the label
    holder's order. ``ids``: party -> its identifiers, in its own order (scenario order of parties)."""
    parties = list(ids)
    secret = {p: _secret(seed, k) for k, p in enumerate(parties)}
    own = _blind(secret[holder], _hash(ids[holder]))  # step 1, computed once for every partner
    keep = np.ones(len(ids[holder]), dtype=bool)
    messages: list[Message] = []
    found: dict[str, dict] = {}  # partner -> its shuffle, where each matched value sits in its message, L's twice
    for k, p in enumerate(parties):
        if p == holder:
            continue
        messages.append(Message(holder, p, _array(own)))
        twice = _blind(secret[p], own)  # step 2: L's set blinded again, in order
        shuffle = np.random.default_rng([int(seed), PSI_STREAM, k, 1]).permutation(len(ids[p]))
        theirs = _blind(secret[p], _hash(ids[p][shuffle]))
        messages += [Message(p, holder, _array(twice)), Message(p, holder, _array(theirs))]
        mine = _blind(secret[holder], theirs)  # step 3
        where = {v: j for j, v in enumerate(mine)}
        keep &= np.array([t in where for t in twice], dtype=bool)
        found[p] = {"shuffle": shuffle, "at": {t: where[t] for t in twice if t in where}, "twice": twice}
    rows = {holder: np.flatnonzero(keep).astype(np.int64)}
    for p, f in found.items():  # step 4: positions in P's shuffled message, which P maps to its own rows
        positions = np.array([f["at"][f["twice"][i]] for i in rows[holder]], dtype=np.int32)
        messages.append(Message(holder, p, positions.view(np.uint8).reshape(len(positions), POSITION)))
        rows[p] = f["shuffle"][positions].astype(np.int64)
    return Alignment({p: rows[p] for p in parties}, tuple(messages))


def bytes_of_alignment(sizes: dict[str, int], holder: str, aligned: int) -> dict[str, tuple[int, int]]:
    """(sent, received) bytes of each party under :func:`align`, from the set sizes alone (the formula the ledger's
    numbers must match): L sends its set and the positions to each partner, a partner its set and L's, blinded."""
    out = {holder: (0, 0)}
    for p, n in sizes.items():
        if p == holder:
            continue
        to_p = POINT * sizes[holder] + POSITION * aligned
        from_p = POINT * (sizes[holder] + n)
        out[p] = (from_p, to_p)
        out[holder] = (out[holder][0] + to_p, out[holder][1] + from_p)
    return out
