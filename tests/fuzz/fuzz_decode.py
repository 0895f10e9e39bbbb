"""atheris (libFuzzer) harness for the decoder path: `service.recognition.preprocess.to_pixels` on client bytes.

    python tests/fuzz/fuzz_decode.py -runs=20000 CORPUS_DIR    # `make fuzz` seeds a corpus and runs this

An input starting with b"RAW:" is read as raw pixels (width, height, dtype from the next bytes, the
rest as data); anything else is an encoded image file. The only acceptable outcomes are a
[28, 28] MNIST-convention array or ImageError (ImageTooLarge included) with a message that does not
quote the input; anything else is a crash, which libFuzzer saves as crash-<sha1> for replay
(`python tests/fuzz/fuzz_decode.py crash-<sha1>`).
"""

from __future__ import annotations

import struct
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from service.recognition.preprocess import ImageError, Payload, RawImage, to_pixels

RAW_PREFIX = b"RAW:"
MAX_PIXELS = 4_000_000
DTYPES = ("uint8", "float32", "float64", "")


def payload_of(data: bytes) -> Payload:
    """Fuzzer bytes -> what a client could send."""
    if data.startswith(RAW_PREFIX) and len(data) >= len(RAW_PREFIX) + 5:
        width, height, dtype = struct.unpack_from("<HHB", data, len(RAW_PREFIX))
        return RawImage(width, height, DTYPES[dtype % len(DTYPES)], data[len(RAW_PREFIX) + 5:])
    return data


def check(data: bytes) -> None:
    """One fuzz input: raise (anything but ImageError) when the decoder path misbehaves."""
    payload = payload_of(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd metadata; only exceptions count
            pixels = to_pixels(payload, max_pixels=MAX_PIXELS)
    except ImageError as exc:
        message = str(exc)
        if not message:
            raise AssertionError("an ImageError without a message") from exc
        # Messages reach the logs; a decoder that quotes a long run of the input must not leak it.
        for start in range(0, max(0, len(data) - 16), 8):
            window = data[start:start + 16]
            if window.isascii() and window.decode() in message:
                raise AssertionError(f"error message quotes the input: {message!r}") from exc
        return
    if pixels.shape != (28, 28) or pixels.dtype not in ("uint8", "float32"):
        raise AssertionError(f"bad output {pixels.shape} {pixels.dtype}")
    if pixels.dtype == "float32" and not (pixels.min() >= 0.0 and pixels.max() <= 1.0):
        raise AssertionError("float32 output outside [0, 1]")


def main() -> None:
    import atheris

    with atheris.instrument_imports():
        from PIL import Image

        Image.init()  # import every format plugin inside the block, so coverage guides into them
        import service.recognition.preprocess  # noqa: F401
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
