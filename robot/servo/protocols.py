"""The codec of each protocol by name: the one place a protocol string becomes framing code."""

from __future__ import annotations

from robot.servo.codec import Codec
from robot.servo.dynamixel import DynamixelCodec
from robot.servo.feetech import FeetechCodec

CODECS: dict[str, Codec] = {"dynamixel": DynamixelCodec(), "feetech": FeetechCodec()}


def codec_for(protocol: str) -> Codec:
    """The codec of `protocol`; ValueError names the unknown protocol and the known ones."""
    try:
        return CODECS[protocol]
    except KeyError:
        raise ValueError(f"unknown servo protocol {protocol!r} (known: {', '.join(CODECS)})") from None
