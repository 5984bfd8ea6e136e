"""Every mode, model and LoRA through the Falcon app, against a real broker and tiny-model node."""

from __future__ import annotations

import base64
import io
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image
from urllib3 import encode_multipart_formdata

from tests.conftest import Stack

SIZE = {"width": 48, "height": 32}
BASE = {"num_inference_steps": 2, "cfg": 3.5, "seed": 42, **SIZE}


def encoded(fmt: str = "PNG", size: tuple[int, int] = (1, 1), color=(120, 60, 200), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 255).save(buf, format=fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


GUIDE_PNG = encoded()  # the guide's examples send a 1x1 PNG everywhere

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("flux1-dev", "text2img", {}),
    ("flux1-dev", "img2img", {"input_image": GUIDE_PNG, "strength": 0.8}),
    ("flux1-fill-dev", "text2img", {}),
    ("flux1-fill-dev", "img2img", {"input_image": GUIDE_PNG, "strength": 0.7}),
    ("flux1-fill-dev", "fill", {"input_image": GUIDE_PNG, "mask_image": GUIDE_PNG}),
    ("flux1-depth-dev", "controlnet", {"controlnet_type": "depth", "control_image": GUIDE_PNG}),
    ("flux1-canny-dev", "controlnet", {"controlnet_type": "canny", "control_image": GUIDE_PNG}),
    ("flux1-openpose-dev", "controlnet", {"controlnet_type": "openpose", "control_image": GUIDE_PNG}),
    ("flux1-redux-dev", "redux", {"input_image": GUIDE_PNG}),
]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Stack]:
    """Serves all six models; its LoRA folder also holds a corrupt file."""
    models = tmp_path_factory.mktemp("models")
    for item in tiny_models.iterdir():
        (models / item.name).symlink_to(item)
    (models / "loras").unlink()
    shutil.copytree(tiny_models / "loras", models / "loras")
    (models / "loras" / "broken.safetensors").write_bytes(b"not a safetensors file")
    stack = Stack(tmp_path_factory.mktemp("full"), models, ())
    yield stack
    stack.close()


def json_body(model: str, mode: str, extra: dict[str, Any], **over: Any) -> dict[str, Any]:
    body = {"prompt": "一只可爱的小猫", "model_id": model, "mode": mode, **BASE, **over}
    for key, value in extra.items():
        body[key] = data_uri(value) if isinstance(value, bytes) else value
    return body


def post_json(stack: Stack, body: dict[str, Any]):
    return stack.http.simulate_post("/generate", json=body)


def post_upload(stack: Stack, model: str, mode: str, extra: dict[str, Any], **over: Any):
    fields: dict[str, Any] = {k: str(v) for k, v in {"prompt": "一只可爱的小猫", "model_id": model, "mode": mode,
                                                     **BASE, **over}.items()}
    for key, value in extra.items():
        fields[key] = (f"{key}.png", value, "image/png") if isinstance(value, bytes) else str(value)
    body, content_type = encode_multipart_formdata(fields)
    return stack.http.simulate_post("/generate/upload", body=body, headers={"Content-Type": content_type})


def png(response) -> bytes:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json["image_base64"])
    assert Image.open(io.BytesIO(data)).format == "PNG"
    return data


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize("model, mode, extra", CASES, ids=[f"{m}-{mode}" for m, mode, _ in CASES])
def test_every_mode_json_and_upload_give_the_same_deterministic_png(full, model, mode, extra) -> None:
    first = png(post_json(full, json_body(model, mode, extra)))
    assert size_of(first) == (48, 32)
    assert png(post_json(full, json_body(model, mode, extra))) == first
    assert png(post_json(full, json_body(model, mode, extra, seed=7))) != first
    assert png(post_upload(full, model, mode, extra)) == first


def test_redux_prompt_may_be_empty_or_absent(full) -> None:
    body = json_body("flux1-redux-dev", "redux", {"input_image": GUIDE_PNG})
    body["prompt"] = ""
    empty = png(post_json(full, body))
    del body["prompt"]
    assert png(post_json(full, body)) == empty


def test_without_model_id_the_mode_picks_its_model(full) -> None:
    cases = [("fill", {"input_image": GUIDE_PNG, "mask_image": GUIDE_PNG}, "flux1-fill-dev"),
             ("redux", {"input_image": GUIDE_PNG}, "flux1-redux-dev"),
             ("controlnet", {"control_image": GUIDE_PNG}, "flux1-depth-dev"),
             ("controlnet", {"control_image": GUIDE_PNG, "controlnet_type": "canny"}, "flux1-canny-dev"),
             ("img2img", {"input_image": GUIDE_PNG}, "flux1-dev")]
    for mode, extra, model in cases:
        body = json_body("", mode, extra)
        del body["model_id"], body["cfg"]
        r = post_json(full, body)
        assert r.status_code == 200 and r.json["model_id"] == model, (mode, r.text[:300])
        assert r.json["metadata"]["cfg"] == (30.0 if mode == "fill" else 3.5)  # catalog.default_cfg
        if mode == "controlnet":
            assert r.json["controlnet_type"] == model.split("-")[1]


def test_img2img_depends_on_strength_and_input(full) -> None:
    source = encoded(size=(48, 32), color=(250, 250, 10))
    weak = png(post_json(full, json_body("flux1-dev", "img2img", {"input_image": source}, strength=0.3)))
    strong = png(post_json(full, json_body("flux1-dev", "img2img", {"input_image": source}, strength=0.9)))
    other = png(post_json(full, json_body("flux1-dev", "img2img", {"input_image": encoded(size=(48, 32))},
                                          strength=0.3)))
    assert weak != strong and weak != other


def test_jpeg_and_webp_inputs_are_accepted(full) -> None:
    for fmt, mime in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        body = json_body("flux1-dev", "img2img", {})
        body["input_image"] = data_uri(encoded(fmt, (20, 20)), mime)
        assert size_of(png(post_json(full, body))) == (48, 32)
    bare = json_body("flux1-dev", "img2img", {})
    bare["input_image"] = base64.b64encode(GUIDE_PNG).decode()  # bare base64, no data: prefix
    assert size_of(png(post_json(full, bare))) == (48, 32)


def test_size_comes_from_the_input_when_not_given_and_is_rounded_down(full) -> None:
    body = json_body("flux1-dev", "img2img", {"input_image": encoded(size=(72, 40))})
    del body["width"], body["height"]
    assert size_of(png(post_json(full, body))) == (64, 32)
    assert size_of(png(post_json(full, json_body("flux1-dev", "text2img", {}, width=50, height=33)))) == (48, 32)


def test_lora_applies_to_its_job_only(full) -> None:
    base = png(post_json(full, json_body("flux1-dev", "text2img", {})))
    reads = full.generator.loras.disk_reads
    with_lora = png(post_json(full, json_body("flux1-dev", "text2img", {},
                                              loras=[{"name": "cute_cat_lora", "weight": 0.8}])))
    with_ext = png(post_json(full, json_body("flux1-dev", "text2img", {},
                                             loras=[{"name": "cute_cat_lora.safetensors", "weight": 0.8}])))
    stronger = png(post_json(full, json_body("flux1-dev", "text2img", {},
                                             loras=[{"name": "cute_cat_lora", "weight": 1.6}])))
    two = png(post_json(full, json_body("flux1-dev", "text2img", {},
                                        loras=[{"name": "cute_cat_lora", "weight": 0.8},
                                               {"name": "styles/watercolor", "weight": 1.0}])))
    after = png(post_json(full, json_body("flux1-dev", "text2img", {})))
    assert with_lora != base and with_lora == with_ext and stronger != with_lora and two != with_lora
    assert after == base  # nothing leaked into the next job
    assert full.generator.loras.disk_reads <= reads + 2  # each file read from disk at most once
    upload = post_upload(full, "flux1-dev", "text2img", {}, loras='[{"name":"cute_cat_lora","weight":0.8}]')
    assert png(upload) == with_lora


def test_loras_listing_is_relative_and_sorted(full) -> None:
    listing = full.http.simulate_get("/loras").json["loras"]
    assert [e["name"] for e in listing] == ["broken.safetensors", "cute_cat_lora.safetensors",
                                            "styles/watercolor.safetensors"]
    assert [e["category"] for e in listing] == ["root", "root", "styles"]
    assert all(not e["name"].startswith("/") and e["size_mb"] >= 0 for e in listing)


def test_a_broken_lora_fails_its_job_and_leaves_the_cache_intact(full) -> None:
    loads = full.generator.cache.loads
    loaded = full.generator.cache.loaded
    r = post_json(full, json_body("flux1-dev", "text2img", {}, loras=[{"name": "broken", "weight": 1.0}]))
    assert r.status_code == 422 and "broken" in r.json["detail"]
    assert full.generator.cache.loads == loads and full.generator.cache.loaded == loaded
    png(post_json(full, json_body("flux1-dev", "text2img", {})))


@pytest.mark.parametrize("over, status, text", [
    ({"model_id": "flux1-dev", "mode": "fill"}, 422, "text2img"),
    ({"model_id": "flux1-redux-dev", "mode": "text2img"}, 422, "redux"),
    ({"model_id": "flux1-depth-dev", "mode": "controlnet", "controlnet_type": "canny",
      "control_image": data_uri(GUIDE_PNG)}, 422, "flux1-canny-dev"),
    ({"mode": "controlnet", "model_id": "flux1-canny-dev", "controlnet_type": "sketch",
      "control_image": data_uri(GUIDE_PNG)}, 422, "controlnet_type"),
    ({"mode": "controlnet", "model_id": "flux1-canny-dev"}, 400, "control_image"),  # a missing image: 400
    ({"mode": "fill", "model_id": "flux1-fill-dev", "input_image": data_uri(GUIDE_PNG)}, 400, "mask_image"),
    ({"mode": "img2img"}, 400, "input_image"),
    ({"mode": "img2img", "input_image": data_uri(GUIDE_PNG), "strength": 1.5}, 422, "strength"),
    ({"mode": "img2img", "input_image": data_uri(GUIDE_PNG), "strength": 0}, 422, "strength"),
    ({"mode": "img2img", "input_image": data_uri(GUIDE_PNG), "strength": float("nan")}, 422, "strength"),
    ({"loras": [{"name": "cute_cat_lora", "weight": float("nan")}]}, 422, "weight"),
    ({"loras": [{"name": "nope", "weight": 1}]}, 400, "nope"),
    ({"loras": [{"name": "../../etc/passwd", "weight": 1}]}, 400, "passwd"),
    ({"loras": [{"name": "cute_cat_lora", "weight": 2.5}]}, 422, "weight"),
    ({"loras": [{"name": "cute_cat_lora", "weight": -0.1}]}, 422, "weight"),
    ({"loras": [{"weight": 1}]}, 422, "name"),
    ({"mode": "img2img", "input_image": "/etc/hostname"}, 400, "input_image"),
    ({"mode": "img2img", "input_image": data_uri(b"garbage bytes")}, 400, "input_image"),
    ({"mode": "img2img", "input_image": data_uri(encoded("GIF"), "image/gif")}, 400, "input_image"),
    ({"mode": "controlnet", "model_id": "flux1-depth-dev", "control_image": 12}, 400, "control_image"),
])
def test_mismatches_and_bad_inputs_are_4xx_and_change_nothing(full, over, status, text) -> None:
    before = len(full.broker.broker.tasks)
    body = {"prompt": "x", **BASE, **over}
    r = post_json(full, body)
    assert r.status_code == status, r.text
    assert r.json["success"] is False and text in r.json["detail"], r.json
    assert len(full.broker.broker.tasks) == before


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_oversized_and_bomb_images_are_refused(full) -> None:
    big = b"\x89PNG" + b"\0" * (10 * 1024 * 1024 + 10)
    r = post_json(full, {"prompt": "x", "mode": "img2img", "input_image": data_uri(big), **BASE})
    assert r.status_code == 413 and "input_image" in r.json["detail"]
    r = post_upload(full, "flux1-dev", "img2img", {"input_image": big})
    assert r.status_code == 413
    for w, h in ((30000, 30000), (5000, 5000)):
        r = post_json(full, {"prompt": "x", "mode": "img2img", "input_image": data_uri(bomb_png(w, h)), **BASE})
        assert r.status_code == 400 and "input_image" in r.json["detail"], r.json
    r = post_upload(full, "flux1-dev", "img2img", {"input_image": b"garbage"})
    assert r.status_code == 400 and "input_image" in r.json["detail"]


def test_upload_needs_multipart(full) -> None:
    r = full.http.simulate_post("/generate/upload", json={"prompt": "x"})
    assert r.status_code == 415 and r.json["success"] is False


def test_models_lists_real_modes_nodes_and_loaded_state(full) -> None:
    png(post_json(full, json_body("flux1-dev", "text2img", {})))
    models = {m["model_id"]: m for m in full.http.simulate_get("/models").json["models"]}
    assert set(models) == {"flux1-dev", "flux1-fill-dev", "flux1-depth-dev", "flux1-canny-dev",
                           "flux1-openpose-dev", "flux1-redux-dev"}
    assert models["flux1-fill-dev"]["modes"] == ["fill", "img2img", "text2img"]
    assert models["flux1-canny-dev"]["controlnet_type"] == "canny"
    assert models["flux1-dev"]["nodes"] == ["test-node"]
    assert models["flux1-dev"]["loaded"] is True and models["flux1-dev"]["loaded_on"] == ["test-node"]
