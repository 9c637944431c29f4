"""images_from_body: the three body shapes, and hostile ones refused as 400 in linear time."""

from __future__ import annotations

import base64
import json

import pytest

from serve_app.errors import ApiError
from serve_app.http import images_from_body

IMG = b"\xff\xd8\xff\xe0 not really a JPEG \r\n--notb\r\n"
MP = "multipart/form-data; boundary=XyZ"


def multipart(*parts: tuple[str, bytes, str], boundary: str = "XyZ") -> bytes:
    out = b""
    for name, data, extra in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\nContent-Type: image/jpeg'
        out += head.encode() + b"\r\n\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def refused(ctype: str, body: bytes, max_items: int = 16) -> str:
    with pytest.raises(ApiError) as e:
        images_from_body(ctype, body, max_items)
    assert e.value.status == 400
    return e.value.message


def test_given_multipart_then_every_image_field_in_order_and_nothing_else() -> None:
    body = multipart(("image", IMG, '; filename="a.jpg"'), ("note", b"hi", ""), ("image", b"2", ""))
    assert images_from_body(MP, body) == [IMG, b"2"]
    assert images_from_body('multipart/form-data; boundary="XyZ"; charset=utf-8', body) == [IMG, b"2"]
    assert images_from_body(MP, b"a preamble\r\n" + body) == [IMG, b"2"]
    assert images_from_body(MP, body + b"an epilogue --XyZ\r\n") == [IMG, b"2"]
    unquoted = b"--XyZ\r\ncontent-disposition: FORM-DATA; name=image\r\n\r\nraw\r\n--XyZ--"
    assert images_from_body(MP, unquoted) == [b"raw"]


def test_given_a_filename_called_image_then_it_is_not_the_image_field() -> None:
    assert "no `image` field" in refused(MP, multipart(("x", IMG, '; filename="image"')))


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("multipart/form-data", multipart(("image", IMG, ""))),  # no boundary
        ("multipart/form-data; boundary=", multipart(("image", IMG, ""))),
        (MP, b""),
        (MP, b"no delimiter at all"),
        (MP, b"--XyZ" + b"junk"),  # the delimiter line does not end
        (MP, b"--XyZ\r\n" + b"H: v\r\n" * 3000 + b"\r\nx\r\n--XyZ--"),  # part headers past 8 KB
        (MP, b"--XyZ\r\nContent-Disposition: form-data; name=image\r\nno blank line\r\n--XyZ--"),
    ],
)
def test_given_malformed_multipart_then_400(ctype: str, body: bytes) -> None:
    refused(ctype, body)


def test_given_many_tiny_parts_then_refused_by_count() -> None:
    body = b"--b\r\n\r\nx\r\n" * 200_000 + b"--b--\r\n"  # the stdlib parser took ~25 s on such a body
    assert "more than 32 parts" in refused("multipart/form-data; boundary=b", body)
    many_images = multipart(*[("image", b"i", "")] * 20)
    assert "at most 16 images" in refused(MP, many_images)


def test_given_json_bodies_then_images_decoded_or_400() -> None:
    one = base64.b64encode(IMG).decode()
    assert images_from_body("application/json", json.dumps({"image": one}).encode()) == [IMG]
    assert images_from_body("application/json", json.dumps({"images": [one, one]}).encode()) == [IMG, IMG]
    for body in (
        b"[" * 5000 + b"]" * 5000,  # nested past the recursion limit
        b"not json",
        b'{"images": []}',
        b'{"images": [1]}',
        b'{"image": "***"}',
        b"[]",
        json.dumps({"images": ["AA=="] * 17}).encode(),
    ):
        refused("application/json", body)


def test_given_any_other_content_type_then_the_body_is_the_image() -> None:
    assert images_from_body("image/png", b"\x89PNG") == [b"\x89PNG"]
    assert images_from_body("", b"raw") == [b"raw"]
