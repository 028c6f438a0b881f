"""Base64, exactly: a hand-written codec and its byte/character dependency map.

Base64 (RFC 4648, standard alphabet ``A-Z a-z 0-9 + /``, ``=`` padding) writes every 3 bytes as 4
characters of 6 bits each. The algorithms here:

1. **Encode.** Take bytes 3 at a time, pack them big-endian into a 24-bit group
   ``g = b0 << 16 | b1 << 8 | b2`` and emit the four 6-bit fields ``g >> 18, g >> 12, g >> 6, g``
   (each ``& 63``) as alphabet characters. A final group of 1 or 2 bytes is zero-filled, emits only the
   2 or 3 characters that carry data bits, and is padded with ``==`` or ``=`` to 4 characters.
2. **Decode** (the inverse) validates first and raises :class:`~recallscope.errors.InvalidBase64Error`
   naming the problem and the fix: (a) every character is in the alphabet or ``=``; (b) the length is a
   multiple of 4; (c) ``=`` appears only as the last one or two characters; (d) *canonical form*, on by
   default: the unused low bits of the last data character before padding (4 bits before ``==``, 2 before
   ``=``) are zero. With (d) every byte string has exactly one encoding, so decoding is injective and
   every character change is visible in the output; this matters for counterfactual pairs and for the
   dependency map below. Pass ``canonical=False`` to ignore those bits, as Python's
   ``base64.b64decode(s, validate=True)`` does. Decoding packs the 6-bit values of a block into a 24-bit
   group and reads out 3 bytes (fewer for a padded block).
3. **Dependency map.** Output byte ``j`` of a block (``j`` in 0..2) takes its 8 bits from input
   characters ``floor(4j/3)`` and ``floor(4j/3) + 1`` of that block: byte 0 from characters 0-1, byte 1
   from 1-2, byte 2 from 2-3. Inverting gives, per character, the bytes it helps determine (character 0:
   byte 0; 1: bytes 0-1; 2: bytes 1-2; 3: byte 2); padding determines nothing. This is the ground truth
   that attribution methods on base64 decoding are scored against (:func:`dependency_map`).

Token alignment, built on the dependency map, lives in :mod:`recallscope.tasks.b64_alignment`.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

from recallscope.errors import ConfigError, InvalidBase64Error
from recallscope.tasks.pairs import check_text

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
"""The standard base64 alphabet: character ``ALPHABET[v]`` encodes the 6-bit value ``v``."""
PAD = "="
"""The padding character."""
_VALUE = {c: v for v, c in enumerate(ALPHABET)}
_FIX_ALPHABET = "the standard alphabet is A-Z, a-z, 0-9, '+' and '/', with '=' padding at the end"


# --------------------------------------------------------------------------------------------- codec
def encode(data: bytes | str) -> str:
    """Base64-encode ``data`` (a ``str`` is encoded as UTF-8 first) with the standard alphabet and padding."""
    if not isinstance(data, (str, bytes, bytearray, memoryview, list, tuple)):
        raise ConfigError(f"encode takes text (str) or bytes, not {type(data).__name__} {str(data)[:40]!r} (bytes() of "
                          "an int is that many zero bytes). Pass str(value) or value.to_bytes(...) explicitly.")
    raw = check_text(data, "text").encode("utf-8") if isinstance(data, str) else bytes(data)
    out: list[str] = []
    for start in range(0, len(raw), 3):
        chunk = raw[start : start + 3]
        padded = chunk + bytes(3 - len(chunk))
        group = (padded[0] << 16) | (padded[1] << 8) | padded[2]  # 24 bits
        sextets = [(group >> shift) & 0x3F for shift in (18, 12, 6, 0)]
        n_data = len(chunk) + 1  # 1 byte -> 2 characters, 2 -> 3, 3 -> 4
        out.append("".join(ALPHABET[v] for v in sextets[:n_data]) + PAD * (4 - n_data))
    return "".join(out)


def decode(text: str, *, canonical: bool = True) -> bytes:
    """Decode standard, padded base64 to bytes; raise :class:`InvalidBase64Error` on anything else.

    Args:
        text: the base64 string. No whitespace, no missing padding, no URL-safe alphabet.
        canonical: also reject non-zero unused bits in the last data character (e.g. ``"QR=="``, whose
            canonical form is ``"QQ=="``), so that each byte string has exactly one accepted encoding.
    """
    _check_characters(text)
    _check_length(text)
    _check_padding(text)
    out = bytearray()
    for start in range(0, len(text), 4):
        data = text[start : start + 4].rstrip(PAD)
        group = 0
        for c in data:
            group = (group << 6) | _VALUE[c]
        group <<= 6 * (4 - len(data))  # 24 bits, zero-filled where padding stood
        if canonical:
            _check_trailing_bits(text, start + len(data) - 1, len(data))
        out.extend([(group >> 16) & 0xFF, (group >> 8) & 0xFF, group & 0xFF][: len(data) - 1])
    return bytes(out)


def decode_text(text: str, *, canonical: bool = True) -> str:
    """Decode base64 to a string (UTF-8); raise :class:`InvalidBase64Error` if the bytes are not UTF-8."""
    raw = decode(text, canonical=canonical)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidBase64Error(
            f"{text[:40]!r} is valid base64 but its bytes are not UTF-8 text ({err.reason} at byte "
            f"{err.start}). Use decode() to get the raw bytes instead of decode_text()."
        ) from None


def _check_characters(text: str) -> None:
    bad = [i for i, c in enumerate(text) if c not in _VALUE and c != PAD]
    if not bad:
        return
    i, c = bad[0], text[bad[0]]
    if c.isspace():
        fix = "remove whitespace and line breaks first, e.g. ''.join(text.split())"
    elif c in "-_":
        fix = "this looks like URL-safe base64: replace '-' with '+' and '_' with '/'"
    else:
        fix = f"remove it or re-copy the string; {_FIX_ALPHABET}"
    raise InvalidBase64Error(
        f"invalid base64: character {c!r} (U+{ord(c):04X}) at index {i} is not in the base64 alphabet "
        f"({len(bad)} such character(s) in total). To fix: {fix}."
    )


def _check_length(text: str) -> None:
    rem = len(text) % 4
    if rem == 0:
        return
    if rem == 1:
        hint = "a block cannot hold a single character: one character is missing or extra"
    else:
        hint = (
            f"if the padding was dropped, append {'=' * (4 - rem)!r} to reach length "
            f"{len(text) + 4 - rem}; otherwise a character is missing or extra"
        )
    raise InvalidBase64Error(
        f"invalid base64: length {len(text)} is not a multiple of 4 (base64 comes in 4-character blocks; "
        f"{len(text)} leaves {rem} over). To fix: {hint}."
    )


def _check_padding(text: str) -> None:
    first = text.find(PAD)
    if first == -1:
        return
    after = text[first:].lstrip(PAD)
    if first < len(text) - 2:
        raise InvalidBase64Error(
            f"invalid base64: padding '=' at index {first} is misplaced: '=' may only be the last one or "
            f"two characters of the string (length {len(text)}), e.g. 'QQ==' or 'QUI='. To fix: remove "
            "padding from the middle (split concatenated base64 strings and decode each), and use at most "
            "two '='."
        )
    if after:
        bad = len(text) - len(after)
        raise InvalidBase64Error(
            f"invalid base64: padding '=' at index {first} is followed by data character {text[bad]!r} at "
            f"index {bad}; padding must come last. To fix: move the '=' to the end of the string."
        )


def _check_trailing_bits(text: str, last: int, n_data: int) -> None:
    n_unused = 2 * (4 - n_data)  # 2 data chars carry 4 unused bits, 3 carry 2, 4 carry none
    value = _VALUE[text[last]]
    if value & ((1 << n_unused) - 1) == 0:
        return
    mask = (1 << n_unused) - 1
    start = last - last % 4
    block = text[start:last] + ALPHABET[value & ~mask] + text[last + 1 : start + 4]
    raise InvalidBase64Error(
        f"non-canonical base64: character {text[last]!r} at index {last} has non-zero unused low bits "
        f"({value & mask:0{n_unused}b}) that encode no byte. To fix: write block {start // 4} as {block!r} "
        "(the canonical encoding of the same bytes), or pass canonical=False to ignore those bits as "
        "Python's base64 module does."
    )


def encoded_length(n_bytes: int) -> int:
    """Length of the padded base64 encoding of ``n_bytes`` bytes."""
    return 4 * ((n_bytes + 2) // 3)


def decoded_length(text: str) -> int:
    """Number of bytes ``text`` decodes to (validated: raises :class:`InvalidBase64Error` if invalid)."""
    return len(decode(text, canonical=False))


# ------------------------------------------------------------------------------------ dependency map
def chars_for_byte(byte_index: int) -> frozenset[int]:
    """Indices of the two base64 characters that determine decoded byte ``byte_index``.

    Byte ``j`` of block ``k`` (global byte ``3k + j``) depends on characters ``4k + floor(4j/3)`` and
    ``4k + floor(4j/3) + 1``.
    """
    if byte_index < 0:
        raise ConfigError(
            f"byte index must be >= 0, got {byte_index}. Pass a 0-based index into the decoded bytes."
        )
    block, j = divmod(byte_index, 3)
    first = 4 * block + (4 * j) // 3
    return frozenset({first, first + 1})


def bytes_for_char(char_index: int, *, n_bytes: int | None = None) -> frozenset[int]:
    """Indices of the decoded bytes that base64 character ``char_index`` helps determine (the inverse map).

    Args:
        char_index: 0-based index into the base64 string.
        n_bytes: the decoded length; bytes at or past it are dropped (so padding determines nothing).
            None means an unbounded string of full blocks.
    """
    if char_index < 0:
        raise ConfigError(f"character index must be >= 0, got {char_index}. Pass a 0-based index.")
    block, pos = divmod(char_index, 4)
    local = [j for j in range(3) if pos in chars_for_byte(j)]
    return frozenset(3 * block + j for j in local if n_bytes is None or 3 * block + j < n_bytes)


@dataclass(frozen=True)
class DependencyMap:
    """Which base64 characters determine which decoded bytes, for an encoding of ``n_bytes`` bytes.

    Attributes:
        n_bytes: decoded length.
        n_chars: encoded length (padding included).
        byte_to_chars: per decoded byte, the base64 character indices it depends on.
        char_to_bytes: per base64 character, the byte indices it helps determine (empty for padding).
    """

    n_bytes: int
    n_chars: int
    byte_to_chars: tuple[frozenset[int], ...]
    char_to_bytes: tuple[frozenset[int], ...]

    def __post_init__(self) -> None:
        assert len(self.byte_to_chars) == self.n_bytes and len(self.char_to_bytes) == self.n_chars
        for j, chars in enumerate(self.byte_to_chars):
            assert all(j in self.char_to_bytes[i] for i in chars), "maps are not inverse"

    def matrix(self) -> Bool[Tensor, "byte char"]:
        """Boolean matrix ``M[j, i]``: byte ``j`` depends on character ``i``."""
        m = torch.zeros(self.n_bytes, self.n_chars, dtype=torch.bool)
        for j, chars in enumerate(self.byte_to_chars):
            m[j, sorted(chars)] = True
        return m


def dependency_map(n_bytes: int) -> DependencyMap:
    """The byte/character dependency map of any base64 encoding of ``n_bytes`` bytes."""
    if n_bytes < 0:
        raise ConfigError(f"n_bytes must be >= 0, got {n_bytes}.")
    n_chars = encoded_length(n_bytes)
    return DependencyMap(
        n_bytes=n_bytes,
        n_chars=n_chars,
        byte_to_chars=tuple(chars_for_byte(j) for j in range(n_bytes)),
        char_to_bytes=tuple(bytes_for_char(i, n_bytes=n_bytes) for i in range(n_chars)),
    )
