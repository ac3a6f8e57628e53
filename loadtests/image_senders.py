"""Sessions that send one large image after another to a gateway, in a process of their own
(bench_gateway's load while it measures a spoken reply's audio gaps): on the measuring
client's event loop, serialising their 9 MB requests would delay the reply's chunks there
and pass for a stall of the gateway. Light on purpose: it imports the client, not the model.

    python -m loadtests.image_senders TARGET KEY IMAGE_FILE SENDERS

prints `sending` once the first image was answered and runs until its stdin closes."""

from __future__ import annotations

import asyncio
import itertools
import struct
import sys
import uuid
import zlib
from pathlib import Path

from iomni.client import AsyncDialogueClient


def png_variant(png: bytes, number: int) -> bytes:
    """The same picture as other bytes (a text chunk before the end): each turn's image is
    new to the embedding cache, so it is decoded and encoded every time, as different photos
    would be (a resent image is neither)."""
    text = b"Comment\x00" + str(number).encode()
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + text))
    end = png.rindex(b"IEND") - 4  # the IEND chunk: its length, type and CRC
    return png[:end] + chunk + png[end:]


async def send(target: str, key: str, image: bytes, senders: int) -> None:
    stop = asyncio.Event()
    sent = itertools.count()
    loop = asyncio.get_running_loop()
    watcher = loop.run_in_executor(None, sys.stdin.buffer.read)  # returns when stdin closes
    watcher.add_done_callback(lambda _: stop.set())
    announced = False

    async def one(client: AsyncDialogueClient) -> None:
        nonlocal announced
        while not stop.is_set():
            images = [png_variant(image, next(sent))]
            await client.chat(
                "", uuid.uuid4().hex, images=images, text="what is it?", max_new_tokens=2
            )
            if not announced:
                announced = True
                print("sending", flush=True)

    async with AsyncDialogueClient(target, key) as client:
        await asyncio.gather(*(one(client) for _ in range(senders)))


def main() -> None:
    target, key, image_file, senders = sys.argv[1:5]
    asyncio.run(send(target, key, Path(image_file).read_bytes(), int(senders)))


if __name__ == "__main__":
    main()
