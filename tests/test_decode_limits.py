"""Oversize images are refused the same way on every path, whatever the warning filters or other
threads do (issue 13, "Hostile images, deterministically", at the decode level)."""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from imgpipe.constants import ID, IMAGE, LABEL
from imgpipe.data.decode import (
    MAX_SOURCE_PIXELS,
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    effective_pixel_limit,
    read_image_header,
)
from imgpipe.data.pipeline import decode_batch
from imgpipe.data.transforms import Preprocess

PRE = Preprocess(image_size=8, mode="L", mean=(0.5,), std=(0.5,))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` (8-bit grey) with one tiny IDAT: a bomb's header
    costs nothing to build, and nothing may decode its pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def valid_png(value: int = 77) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (12, 12), value).save(buf, format="PNG")
    return buf.getvalue()


BETWEEN = png_header(10_000, 9_000)  # 90 MP: above Pillow's warning, below its error threshold
HUGE = png_header(20_000, 20_000)  # 400 MP: Pillow raises DecompressionBombError itself
OURS = png_header(9_000, 8_000)  # 72 MP: only our limit refuses it
LONG = png_header(20_000, 10)  # few pixels, absurd side


def refusal(data: bytes) -> str:
    with pytest.raises(ImageTooLargeError) as e:
        decode_image(data, PRE)
    return str(e.value)


@pytest.mark.parametrize("action", ["default", "ignore", "error", "always"])
@pytest.mark.parametrize("data", [BETWEEN, HUGE, OURS], ids=["90MP", "400MP", "72MP"])
def test_refusal_does_not_depend_on_warning_filters(action, data):
    with warnings.catch_warnings():  # single-threaded test: restores the filters afterwards
        warnings.simplefilter(action)
        msg = refusal(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert refusal(data) == msg
    assert str(MAX_SOURCE_PIXELS) in msg and "pixels" in msg


def test_refusal_names_the_pixel_count():
    assert "90000000 pixels exceed the limit of 64000000" in refusal(BETWEEN)
    assert "side longer than" in refusal(LONG)


def test_header_is_refused_before_any_pixel_is_decoded():
    with pytest.raises(ImageTooLargeError):
        read_image_header(BETWEEN)
    assert read_image_header(valid_png()) == (12, 12, "L")


def test_own_limit_and_pillow_limit(monkeypatch):
    with pytest.raises(ImageTooLargeError, match="limit of 100 pixels"):
        decode_image(valid_png(), PRE, max_pixels=100)
    assert decode_image(valid_png(), PRE, max_pixels=144).shape == (8, 8, 1)
    # A process that lowered Pillow's own guard gets that lower limit, deterministically.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert effective_pixel_limit() == 100
    for action in ("ignore", "error"):
        with warnings.catch_warnings():
            warnings.simplefilter(action)
            with pytest.raises(ImageTooLargeError, match="144 pixels exceed the limit of 100"):
                decode_image(valid_png(), PRE)


def test_concurrent_hostile_and_valid_images_under_filter_churn():
    """Threads decode bombs and valid images while another thread keeps installing and
    restoring an "error" filter (what ``catch_warnings`` in a thread pool does): every bomb
    is refused with one message, every valid image decodes to the same pixels."""
    expected_msg, expected_px = refusal(BETWEEN), decode_image(valid_png(), PRE)
    stop, failures = threading.Event(), []

    def churn() -> None:
        while not stop.is_set():
            with warnings.catch_warnings():
                warnings.simplefilter("error")

    def work(k: int) -> None:
        for i in range(60):
            data = (BETWEEN, HUGE, valid_png())[(i + k) % 3]
            try:
                px = decode_image(data, PRE)
                if data in (BETWEEN, HUGE) or not np.array_equal(px, expected_px):
                    failures.append(f"thread {k}: wrong result for item {i}")
            except ImageTooLargeError as e:
                if data is BETWEEN and str(e) != expected_msg:
                    failures.append(f"thread {k}: message {e}")
            except Exception as e:  # noqa: BLE001 — anything else is the bug under test
                failures.append(f"thread {k}: {type(e).__name__}: {e}")

    with warnings.catch_warnings():
        churner = threading.Thread(target=churn)
        workers = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        churner.start()
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        stop.set()
        churner.join()
    assert not failures, failures[:5]


def test_stream_skips_and_counts_bombs():
    """The Ray Data stream's decode step (called here directly) flags bombs as corrupt rows."""
    batch = {IMAGE: np.array([valid_png(), BETWEEN, HUGE, b"junk"], dtype=object),
             LABEL: np.array([0, 1, 0, 1]), ID: np.array(["a", "b", "c", "d"], dtype=object)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_batch(batch, PRE)
    assert out["corrupt"].tolist() == [0, 1, 1, 1]


def test_decode_errors_share_one_type():
    assert issubclass(ImageTooLargeError, ImageDecodeError)
    with pytest.raises(ImageDecodeError, match="unrecognised format"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", PRE)


@pytest.mark.parametrize("action", ["default", "error"])
def test_serving_header_check_is_a_400_whatever_the_filters(action):
    from serving.errors import ApiError
    from serving.inputs import check_image_header

    with warnings.catch_warnings():
        warnings.simplefilter(action)
        with pytest.raises(ApiError) as e:
            check_image_header(BETWEEN, 16_000_000, "image")
        check_image_header(valid_png(), 16_000_000, "image")  # a valid image passes
        check_image_header(b"junk", 16_000_000, "image")  # decode_image reports junk later
    assert e.value.status == 400 and "exceed the limit of 16000000 pixels" in str(e.value)


def test_ingest_and_evaluation_skip_and_count_bombs(tmp_path):
    import torch

    from imgpipe.constants import TEST
    from imgpipe.data.ingest import ingest_image_folder
    from imgpipe.data.shards import write_shards
    from imgpipe.evaluate import predict_split

    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "src" / c / f"{i}.png").write_bytes(valid_png(10 * i + (c == "b")))
    (tmp_path / "src" / "a" / "bomb.png").write_bytes(BETWEEN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = ingest_image_folder(str(tmp_path / "src"))
    assert data.skipped_count == 1 and "exceed the limit" in data.skipped[0]["reason"]
    # Shards that carry a bomb anyway (written by another tool): evaluation skips and counts it.
    recs = [{IMAGE: valid_png(), LABEL: 0, "label_name": "a", ID: "ok"},
            {IMAGE: BETWEEN, LABEL: 1, "label_name": "b", ID: "bomb"}]
    write_shards(str(tmp_path / "shards"), {TEST: recs}, ["a", "b"], {"source": "t", "mode": "L"})
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred = predict_split(model, PRE, str(tmp_path / "shards"), TEST)
    assert pred.skipped == 1 and pred.ids == ["ok"]
