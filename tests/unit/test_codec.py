import pytest

from kvstore.codec import HEADER_SIZE, BlockUnit, CorruptValue, decode, encode

UNIT = BlockUnit(
    fingerprint=b"\x01" * 32, block_hash=b"\x02" * 32, dtype="float16", shape=(2, 2, 4, 1, 8),
    head_start=0, head_end=1, total_heads=1,
)
PAYLOAD = bytes(range(256)) * 1  # 2*2*4*1*8 halves = 256 bytes


def test_round_trip():
    value = encode(UNIT, PAYLOAD)
    assert len(value) == HEADER_SIZE + 256 and value[:4] == b"KVTB"
    assert bytes(decode(value, UNIT)) == PAYLOAD


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda v: v[:10], "shorter than"),
        (lambda v: b"XXXX" + v[4:], "bad magic"),
        (lambda v: v[:-1], "payload is 255 bytes"),
        (lambda v: v + b"\0", "payload is 257 bytes"),
        (lambda v: v[:-1] + bytes([v[-1] ^ 1]), "checksum"),
        (lambda v: v[:HEADER_SIZE - 1] + bytes([v[HEADER_SIZE - 1] ^ 1]) + v[HEADER_SIZE:], "checksum"),
    ],
)
def test_damaged_values_are_rejected(damage, message):
    with pytest.raises(CorruptValue, match=message):
        decode(damage(encode(UNIT, PAYLOAD)), UNIT)


@pytest.mark.parametrize(
    "other",
    [
        BlockUnit(b"\x09" * 32, UNIT.block_hash, "float16", UNIT.shape, 0, 1, 1),  # another model
        BlockUnit(UNIT.fingerprint, b"\x09" * 32, "float16", UNIT.shape, 0, 1, 1),  # another block
        BlockUnit(UNIT.fingerprint, UNIT.block_hash, "bfloat16", UNIT.shape, 0, 1, 1),  # another dtype
        BlockUnit(UNIT.fingerprint, UNIT.block_hash, "float16", (2, 2, 4, 1, 8), 1, 2, 2),  # other heads
    ],
)
def test_a_value_for_another_unit_is_rejected(other):
    with pytest.raises(CorruptValue, match="does not match"):
        decode(encode(UNIT, PAYLOAD), other)


def test_encode_checks_the_payload_size():
    with pytest.raises(ValueError):
        encode(UNIT, PAYLOAD[:-2])
