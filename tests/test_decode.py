"""decode_image on every mode Pillow can hand us, EXIF orientation, bit depth (issue 10, A)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from imgpipe.data.decode import GREY_MODES, decode_image, open_image, to_mode
from imgpipe.data.transforms import Preprocess

L8 = Preprocess(image_size=8, mode="L", mean=(0.5,), std=(0.5,))
RGB8 = Preprocess(image_size=8, mode="RGB", mean=(0.5,) * 3, std=(0.5,) * 3)
ORIENTATION = 0x0112


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk (length, type, body, CRC)."""
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def luma(rgb: tuple[int, int, int]) -> int:
    """Pillow's ITU-R 601-2 luma of one colour (the documented RGB → L rule)."""
    return Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0))


def palette_image(colour: tuple[int, int, int], mode: str = "P") -> Image.Image:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, *colour] + [0] * 762)
    return img if mode == "P" else Image.merge("PA", (img, Image.new("L", (8, 8), 255)))


def u16(value: int) -> Image.Image:
    return Image.fromarray(np.full((8, 8), value, np.uint16))


def u16b(value: int | np.ndarray) -> Image.Image:
    # built from bytes: Pillow's convert("I;16B") clips to 8 bits
    a = np.broadcast_to(np.asarray(value, dtype=">u2"), (8, 8))
    return Image.frombytes("I;16B", (8, 8), np.ascontiguousarray(a).tobytes())


def i32(value: int) -> Image.Image:
    return Image.fromarray(np.full((8, 8), value, np.int32))


def f32(value: float) -> Image.Image:
    return Image.fromarray(np.full((8, 8), value, np.float32))


def pa_transparent() -> Image.Image:
    img = palette_image((10, 20, 30))
    return Image.merge("PA", (img, Image.new("L", (8, 8), 0)))


# (case, the source: bytes or an in-memory image for modes no file format yields, mode Pillow
# hands us, expected RGB of every output pixel). Expected L is Pillow's luma of that RGB.
CASES = [
    ("1 white", lambda: encode(Image.new("1", (8, 8), 1), "PNG"), "1", (255, 255, 255)),
    ("L", lambda: encode(Image.new("L", (8, 8), 100), "PNG"), "L", (100, 100, 100)),
    ("L + tRNS key", lambda: encode(Image.new("L", (8, 8), 100), "PNG", transparency=100),
     "L", (0, 0, 0)),
    ("LA opaque", lambda: encode(Image.new("LA", (8, 8), (200, 255)), "PNG"), "LA",
     (200, 200, 200)),
    ("LA transparent", lambda: encode(Image.new("LA", (8, 8), (200, 0)), "PNG"), "LA", (0, 0, 0)),
    ("La premultiplied", lambda: Image.new("La", (8, 8), (100, 128)), "La", (100, 100, 100)),
    ("P", lambda: encode(palette_image((10, 20, 30)), "PNG"), "P", (10, 20, 30)),
    ("P + transparency", lambda: encode(palette_image((10, 20, 30)), "PNG", transparency=1),
     "P", (0, 0, 0)),
    ("P GIF + transparency", lambda: encode(palette_image((10, 20, 30)), "GIF", transparency=1),
     "P", (0, 0, 0)),
    ("PA opaque", lambda: encode(palette_image((10, 20, 30), "PA"), "TIFF"), "PA", (10, 20, 30)),
    ("PA transparent", lambda: encode(pa_transparent(), "TIFF"), "PA", (0, 0, 0)),
    ("RGB", lambda: encode(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG"), "RGB", (10, 20, 30)),
    ("RGB + tRNS key", lambda: encode(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG",
                                      transparency=(10, 20, 30)), "RGB", (0, 0, 0)),
    ("RGBA opaque", lambda: encode(Image.new("RGBA", (8, 8), (10, 20, 30, 255)), "PNG"),
     "RGBA", (10, 20, 30)),
    ("RGBA transparent", lambda: encode(Image.new("RGBA", (8, 8), (10, 20, 30, 0)), "PNG"),
     "RGBA", (0, 0, 0)),
    ("RGBa premultiplied", lambda: Image.new("RGBa", (8, 8), (50, 60, 70, 128)), "RGBa",
     (50, 60, 70)),
    ("CMYK magenta", lambda: encode(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "TIFF"), "CMYK",
     (255, 0, 255)),
    ("YCbCr grey", lambda: encode(Image.new("YCbCr", (8, 8), (200, 128, 128)), "TIFF"),
     "YCbCr", (200, 200, 200)),
    ("LAB black", lambda: encode(Image.new("LAB", (8, 8), (0, 128, 128)), "TIFF"), "LAB",
     (1, 0, 1)),
    ("HSV red", lambda: Image.new("HSV", (8, 8), (0, 255, 255)), "HSV", (255, 0, 0)),
    ("I;16 PNG white", lambda: encode(u16(65535), "PNG"), "I;16", (255, 255, 255)),
    ("I;16 PNG 15000", lambda: encode(u16(15000), "PNG"), "I;16", (58, 58, 58)),
    ("I;16 PNG black", lambda: encode(u16(0), "PNG"), "I;16", (0, 0, 0)),
    ("I;16 PNG + tRNS key", lambda: encode(u16(1000), "PNG", transparency=1000), "I;16",
     (0, 0, 0)),
    ("I;16 TIFF 32896", lambda: encode(u16(32896), "TIFF"), "I;16", (128, 128, 128)),
    ("I;16 TIFF 32895", lambda: encode(u16(32895), "TIFF"), "I;16", (128, 128, 128)),
    ("I;16 TIFF 32767", lambda: encode(u16(32767), "TIFF"), "I;16", (127, 127, 127)),
    ("I;16B TIFF white", lambda: encode(u16b(65535), "TIFF"), "I;16B",
     (255, 255, 255)),
    ("I;16B TIFF 15000", lambda: encode(u16b(15000), "TIFF"), "I;16B",
     (58, 58, 58)),
    ("I;16N", lambda: Image.new("I;16N", (8, 8), 65535), "I;16N", (255, 255, 255)),
    ("I 16-bit PGM", lambda: encode(u16(15000), "PPM"), "I", (58, 58, 58)),
    ("I TIFF 65535", lambda: encode(i32(65535), "TIFF"), "I", (255, 255, 255)),
    ("I TIFF negative", lambda: encode(i32(-5), "TIFF"), "I", (0, 0, 0)),
    ("I TIFF above 16 bits", lambda: encode(i32(1 << 20), "TIFF"), "I", (255, 255, 255)),
    ("F 1.0", lambda: encode(f32(1.0), "TIFF"), "F", (255, 255, 255)),
    ("F 0.5", lambda: encode(f32(0.5), "TIFF"), "F", (128, 128, 128)),
    ("F 0.0", lambda: encode(f32(0.0), "TIFF"), "F", (0, 0, 0)),
    ("F out of range", lambda: encode(f32(7.5), "TIFF"), "F", (255, 255, 255)),
]


@pytest.mark.parametrize(("source", "native", "rgb"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_mode_table(source, native, rgb):
    src = source()
    if isinstance(src, bytes):
        assert open_image(src).mode == native  # the case really exercises that mode
        out_rgb, out_l = decode_image(src, RGB8), decode_image(src, L8)
    else:
        assert src.mode == native
        out_rgb, out_l = np.asarray(to_mode(src, "RGB")), np.asarray(to_mode(src, "L"))
    assert out_rgb.reshape(-1, 3).tolist() == [list(rgb)] * 64
    assert out_l.ravel().tolist() == [luma(rgb)] * 64


def test_sixteen_bit_maps_by_bit_depth_not_per_image():
    ramp16 = np.linspace(0, 15000, 64).round().astype(np.uint16).reshape(8, 8)
    ramp8 = (ramp16 >> 8).astype(np.uint8)  # what Pillow keeps of 16-bit colour files
    out16 = decode_image(encode(Image.fromarray(ramp16), "PNG"), L8)[..., 0]
    out8 = decode_image(encode(Image.fromarray(ramp8), "PNG"), L8)[..., 0]
    assert int(out16.min()) == 0 and int(out16.max()) == 58  # not stretched to 0..255
    np.testing.assert_array_equal(out16, out8)  # 16-bit data decodes like its 8-bit version


def test_two_exposures_stay_different():
    scene = np.linspace(100, 12000, 64).round().astype(np.uint16).reshape(8, 8)
    once = decode_image(encode(Image.fromarray(scene), "PNG"), L8).astype(int)
    four = decode_image(encode(Image.fromarray(scene * 4), "PNG"), L8).astype(int)
    assert (four > once).all()
    np.testing.assert_allclose(four, 4 * once, atol=3)


def test_sixteen_bit_grey_agrees_with_sixteen_bit_colour():
    """Pillow reads 16-bit RGB PNGs itself (keeping the high byte); grey must agree."""
    grey = np.arange(0, 65536, 1021, dtype=np.uint16)[:64].reshape(8, 8)
    png16_rgb = b"\x89PNG\r\n\x1a\n"  # built by hand: Pillow cannot write 16-bit RGB
    rows = b"".join(b"\x00" + np.repeat(r, 3).astype(">u2").tobytes() for r in grey)
    png16_rgb += chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0))
    png16_rgb += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    colour = decode_image(png16_rgb, RGB8)[..., 0]
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(grey), "PNG"), L8)[..., 0],
                                  colour)


def test_all_white_sixteen_bit_is_white():
    assert (decode_image(encode(u16(65535), "PNG"), L8) == 255).all()


def test_grey_modes_are_exactly_the_colourless_ones():
    assert {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"} == GREY_MODES
    assert not GREY_MODES & {"P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"}


# --- orientation -------------------------------------------------------------------------------


def upright_rgb() -> np.ndarray:
    """A square picture whose only bright quadrant is the top-left one."""
    a = np.full((8, 8, 3), 20, np.uint8)
    a[:4, :4] = (230, 120, 40)
    return a


def stored_for_orientation(img: Image.Image, orientation: int) -> Image.Image:
    """What a camera stores so that applying ``orientation`` shows ``img`` upright."""
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
            8: Image.Transpose.ROTATE_270, 2: Image.Transpose.FLIP_LEFT_RIGHT}
    return img.transpose(undo[orientation])


def with_exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def as_mode(mode: str) -> Image.Image:
    rgb = Image.fromarray(upright_rgb())
    grey = np.asarray(rgb.convert("L")).astype(np.uint16)
    if mode == "I;16":
        return Image.fromarray(grey * 257)
    if mode == "I;16B":
        return u16b(grey * 257)
    if mode == "I":
        return Image.fromarray(grey.astype(np.int32) * 257)
    if mode == "F":
        return Image.fromarray(grey.astype(np.float32) / 255.0)
    if mode == "RGBA":  # one not-quite-opaque pixel, or WebP stores no alpha at all
        rgba = np.dstack([upright_rgb(), np.full((8, 8), 255, np.uint8)])
        rgba[7, 7, 3] = 250
        return Image.fromarray(rgba)
    return rgb.convert(mode)


ORIENTED = [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "L"),
            ("PNG", "LA"), ("PNG", "P"), ("PNG", "RGBA"), ("PNG", "I;16"), ("TIFF", "CMYK"),
            ("TIFF", "I;16B"), ("TIFF", "I"), ("TIFF", "F"), ("TIFF", "LAB"), ("TIFF", "YCbCr"),
            ("WEBP", "RGB"), ("WEBP", "RGBA")]


@pytest.mark.parametrize(("fmt", "mode"), ORIENTED, ids=[f"{f}-{m}" for f, m in ORIENTED])
@pytest.mark.parametrize("orientation", [3, 6, 8, 2])
def test_orientation_applies_to_every_mode(fmt, mode, orientation):
    img = as_mode(mode)
    stored = encode(stored_for_orientation(img, orientation), fmt, exif=with_exif(orientation))
    assert open_image(stored).mode in (mode, "I;16")  # PNG/TIFF may hand I;16B back as I;16
    out = decode_image(stored, L8)[..., 0].astype(int)
    top_left, rest = out[:4, :4].mean(), np.concatenate([out[4:].ravel(), out[:4, 4:].ravel()])
    assert top_left > rest.mean() + 40, f"bright quadrant not at top-left:\n{out}"


def test_cmyk_jpeg_orientation_matches_rgb_jpeg():
    """The reported case: a CMYK JPEG with Orientation=6 must decode like the RGB one."""
    img = Image.fromarray(upright_rgb())
    stored = stored_for_orientation(img, 6)
    rgb = decode_image(encode(stored, "JPEG", exif=with_exif(6), quality=95), RGB8).astype(int)
    cmyk = decode_image(encode(stored.convert("CMYK"), "JPEG", exif=with_exif(6), quality=95),
                        RGB8).astype(int)
    upright = decode_image(encode(img, "JPEG", quality=95), RGB8).astype(int)
    assert np.abs(cmyk - upright).mean() < 6 and np.abs(rgb - upright).mean() < 6
