"""A manual Converse turn assembled from its messages (no server)."""

from __future__ import annotations

from iomni.gateway.service import TurnAssembler
from iomni.v1 import dialogue_pb2 as pb


def video(data: bytes, frames: int = 0) -> pb.ConverseRequest:
    return pb.ConverseRequest(video=pb.UserVideo(data=data, end_of_video=True, frames=frames))


def test_a_videos_frame_count_is_its_own() -> None:
    """A video sent without `frames` gets the default (8), not the count of the one before."""
    assembler = TurnAssembler(1 << 20)
    assembler.add(video(b"first", frames=32))
    assembler.add(video(b"second"))
    first, second = assembler.finish().parts
    assert first.num_frames == 32 and second.num_frames is None
    assembler.add(video(b"next turn"))
    (third,) = assembler.finish().parts
    assert third.num_frames is None
