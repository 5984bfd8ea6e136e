"""GET /openapi.json and GET /docs, and the typed request contract they publish (no broker, no models).

The document must be valid OpenAPI 3.1, describe every route the app serves with the
permissions its resource declares, and take its schemas from the msgspec types the front
decodes requests into. The validator must turn requests into one TaskSpec with every default.
"""

from __future__ import annotations

import base64
import io
import re
import typing
from typing import Any

import msgspec
import pytest
from falcon import testing
from openapi_spec_validator import validate
from PIL import Image

from genserve import catalog, wire
from genserve.spec import GenerationParams, LoraRef, TaskSpec
from http_front import schemas
from http_front.app import create_app
from http_front.config import FrontConfig
from http_front.errors import ApiError
from http_front.keys import PERMISSIONS, KeyStore
from http_front.openapi import OPERATIONS, REF, permissions, routes
from http_front.resources.docs import CSP, PAGE
from http_front.validation import RequestValidator

READONLY = "openapi-readonly-key-0123456789abcdef"


def build(config: FrontConfig | None = None) -> tuple[Any, testing.TestClient]:
    """An app without a broker (nothing opened) and a client for it."""
    app = create_app(None, KeyStore.from_env([(READONLY, "ro", ("readonly",))], None), config)
    return app, testing.TestClient(app)


@pytest.fixture(scope="module")
def served() -> tuple[Any, dict[str, Any]]:
    """The app and the document it serves."""
    app, client = build()
    r = client.simulate_get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    return app, r.json


def png(size: tuple[int, int] = (1, 1)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


# ---- the document --------------------------------------------------------------------------

def test_the_document_is_valid_openapi_3_1(served) -> None:
    _, doc = served
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema


def test_every_route_is_described_and_nothing_else(served) -> None:
    app, doc = served
    served_ops = {(method, path) for method, path, _ in routes(app)}
    described = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert served_ops == described
    assert served_ops == set(OPERATIONS)  # no route falls back to a minimal description
    assert len(served_ops) == 25


def test_permissions_come_from_the_resources(served) -> None:
    app, doc = served
    for method, path, resource in routes(app):
        op = doc["paths"][path][method.lower()]
        needed = resource.auth[method] if not getattr(resource, "public", False) else ()
        assert op["x-permissions"] == permissions(resource, method)
        assert set(needed) <= set(op["x-permissions"]), (method, path)
        if needed:
            assert {"admin", "all"} <= set(op["x-permissions"])
            assert op["security"] == [{"bearerAuth": []}, {"apiKeyAuth": []}]
            assert {"401", "403", "429"} <= set(op["responses"])
    public = {(m, p) for p, ops in doc["paths"].items() for m, op in ops.items() if op["security"] == []}
    assert public == {("get", "/openapi.json"), ("get", "/docs"), ("get", "/ui"), ("get", "/ui/{name}")}
    assert doc["paths"]["/task/{task_id}"]["get"]["x-permissions"] == ["readonly", "generation", "admin", "all"]
    assert doc["paths"]["/metrics"]["get"]["x-permissions"] == ["metrics", "admin", "all"]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "`Authorization: Bearer KEY` (preferred)"}
    assert doc["components"]["securitySchemes"]["apiKeyAuth"]["name"] == "X-API-Key"


def test_schemas_are_generated_from_the_msgspec_types() -> None:
    config = FrontConfig(max_prompt_length=123, max_image_size=512)
    _, client = build(config)
    doc = client.simulate_get("/openapi.json").json
    body_type = schemas.generate_body_type(123, 512)
    _, generated = msgspec.json.schema_components([body_type, *schemas.RESPONSE_TYPES], ref_template=REF)
    components = doc["components"]["schemas"]
    for name, schema in generated.items():
        assert components[name] == schema, name
    props = components["GenerateRequest"]["properties"]
    assert props["prompt"]["maxLength"] == 123 and props["width"]["maximum"] == 512
    assert props["mode"]["enum"] == sorted(catalog.MODES)
    upload = components["GenerateUploadForm"]["properties"]
    assert all(upload[name]["format"] == "binary" for name in catalog.IMAGE_FIELDS)
    assert upload["loras"]["type"] == "string"


def test_generate_declares_its_headers_bodies_and_answers(served) -> None:
    _, doc = served
    op = doc["paths"]["/generate"]["post"]
    assert {p["name"] for p in op["parameters"]} == {"Idempotency-Key", "Prefer"}
    assert set(op["requestBody"]["content"]) == {"application/json"}
    assert {"200", "202", "400", "413", "415", "422", "429", "431", "500", "503", "504"} <= set(op["responses"])
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/TaskBody")
    assert op["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/AcceptedBody")
    shapes = op["responses"]["429"]["content"]["application/json"]["schema"]["anyOf"]
    assert [s["$ref"].rsplit("/", 1)[1] for s in shapes] == ["ErrorBody", "AuthErrorBody"]
    upload = doc["paths"]["/generate/upload"]["post"]["requestBody"]["content"]
    assert set(upload) == {"multipart/form-data"}
    assert set(doc["paths"]["/auth/generate-key"]["post"]["requestBody"]["content"]) == {
        "multipart/form-data", "application/x-www-form-urlencoded", "application/json"}


def test_literals_match_the_catalog() -> None:
    assert typing.get_args(schemas.Mode) == catalog.MODES
    assert set(typing.get_args(schemas.ControlType)) == set(catalog.CONTROL_TYPES.values())
    assert typing.get_args(schemas.Permission) == PERMISSIONS
    assert set(typing.get_args(schemas.TaskStatus)) == {wire.QUEUED, wire.RUNNING, *wire.FINAL_STATES}


# ---- public resources and /docs ------------------------------------------------------------

def test_only_the_description_and_the_page_are_public() -> None:
    app, client = build()
    for path in ("/openapi.json", "/docs", "/ui", "/ui/ui.js"):
        assert client.simulate_get(path).status_code == 200, path
    for method, path, resource in routes(app):
        if path in ("/openapi.json", "/docs", "/ui", "/ui/{name}"):
            continue
        r = client.simulate_request(method, path.replace("{task_id}", "x"))
        assert r.status_code == 401 and set(r.json) == {"detail"}, (method, path)
    r = client.simulate_get("/openapi.json", headers={"X-Huge": "x" * 40_000})
    assert r.status_code == 431 and r.json["success"] is False  # header limits still apply


def test_a_resource_is_public_only_if_it_says_so() -> None:
    from http_front.auth import is_public

    class Sneaky:
        public = "yes"

    assert not is_public(Sneaky()) and not is_public(object())


def test_docs_page_is_self_contained_under_a_strict_csp() -> None:
    _, client = build()
    r = client.simulate_get("/docs")
    assert r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    assert policy == CSP
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'" and directives["connect-src"] == "'self'"
    assert "unsafe" not in policy and "http" not in policy and "*" not in policy
    assert r.headers["x-content-type-options"] == "nosniff"
    page = r.content
    assert page == PAGE
    assert not re.search(rb"(https?:)?//[a-z0-9]", page.replace(b"'use strict'", b"")), "no remote URL"
    assert b" src=" not in page and b"<link" not in page and b"innerHTML" not in page
    assert b"fetch('openapi.json'" in page


# ---- one typed contract: requests into a TaskSpec ------------------------------------------

@pytest.fixture(scope="module")
def validator() -> RequestValidator:
    return RequestValidator()


def refused(validator: RequestValidator, body: dict[str, Any], images: dict[str, Any] | None = None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        validator.validate(body, images or {})
    return caught.value


def test_a_text2img_request_becomes_a_spec_with_every_default(validator) -> None:
    request = validator.validate({"prompt": "猫"}, {})
    assert request.spec == TaskSpec("flux1-dev", "text2img", 0, GenerationParams(
        prompt="猫", width=1024, height=1024, num_inference_steps=50, seed=42, cfg=3.5, strength=0.8,
        controlnet_type=None, loras=[]))
    assert request.images == {} and request.is_async is False
    # What travels: msgspec builtins, strictly convertible back (the broker's decoder is strict).
    assert msgspec.convert(msgspec.to_builtins(request.spec), TaskSpec) == request.spec


@pytest.mark.parametrize("body, images, model, control, cfg", [
    ({"mode": "fill"}, ("input_image", "mask_image"), "flux1-fill-dev", None, 30.0),
    ({"mode": "redux"}, ("input_image",), "flux1-redux-dev", None, 3.5),
    ({"mode": "controlnet"}, ("control_image",), "flux1-depth-dev", "depth", 3.5),
    ({"mode": "controlnet", "controlnet_type": "openpose"}, ("control_image",), "flux1-openpose-dev", "openpose", 3.5),
    ({"mode": "img2img", "cfg": 7}, ("input_image",), "flux1-dev", None, 7.0),
    ({"mode": "text2img", "model_id": "flux1-fill-dev"}, (), "flux1-fill-dev", None, 30.0),
])
def test_the_mode_implies_model_controlnet_type_and_cfg(validator, body, images, model, control, cfg) -> None:
    request = validator.validate({"prompt": "x", **body}, {name: png() for name in images})
    assert (request.spec.model_id, request.spec.params.controlnet_type, request.spec.params.cfg) == (model, control, cfg)
    assert set(request.images) == set(catalog.REQUIRED_IMAGES[body["mode"]])


@pytest.mark.parametrize("mode", [m for m in catalog.MODES if catalog.REQUIRED_IMAGES[m]])
def test_a_missing_image_is_a_400_naming_it(validator, mode) -> None:
    error = refused(validator, {"prompt": "x", "mode": mode})
    first = catalog.REQUIRED_IMAGES[mode][0]
    assert error.status == 400 and error.extra["field"] == first and first in error.detail


def test_images_the_mode_does_not_use_are_ignored_undecoded(validator) -> None:
    request = validator.validate({"prompt": "x"}, {"input_image": "not base64 at all", "mask_image": 12})
    assert request.images == {}
    assert refused(validator, {"prompt": "x", "mode": "img2img"}, {"input_image": "not base64"}).status == 400
    data = "data:image/png;base64," + base64.b64encode(png((80, 40))).decode()
    request = validator.validate({"prompt": "x", "mode": "img2img"}, {"input_image": data})
    assert (request.spec.params.width, request.spec.params.height) == (80, 32)  # the input's size, rounded down


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": "x", "width": "64"}, 422, "width"),
    ({"prompt": "x", "width": 15}, 422, "width"),
    ({"prompt": "x", "strength": 0}, 422, "strength"),
    ({"prompt": "x", "mode": "paint"}, 422, "mode"),
    ({"prompt": "x", "loras": [{"weight": 1}]}, 422, "loras.0.name"),
    ({"prompt": "x", "loras": [{"name": "a", "weight": 2.5}]}, 422, "loras.0.weight"),
    ({"prompt": "x", "loras": [{"name": "a"}] * 9}, 422, "loras"),
    ({"prompt": "x", "async": "yes"}, 422, "async"),
    ({"prompt": "x", "cfg": float("nan")}, 422, "cfg"),
    ({"prompt": "   "}, 422, "prompt"),
    ({"mode": "text2img"}, 422, "prompt"),
    ({"prompt": "x", "model_id": "flux1-dev", "mode": "fill"}, 422, "mode"),
    ({"prompt": "x", "model_id": "flux1-depth-dev", "mode": "controlnet", "controlnet_type": "canny"},
     422, "controlnet_type"),
])
def test_schema_and_range_violations_are_422_naming_the_field(validator, body, status, field) -> None:
    error = refused(validator, body)
    assert (error.status, error.extra["field"]) == (status, field)
    assert error.detail.startswith(field + ":") or field in error.detail


def test_json_numbers_follow_json_and_loras_become_canonical(validator) -> None:
    request = validator.validate({"prompt": "x", "width": 100.0, "height": 70, "seed": 7.0, "cfg": 3,
                                  "loras": [{"name": "cute_cat_lora"}, {"name": "s/w.safetensors", "weight": 0}]},
                                 {})
    params = request.spec.params
    assert (params.width, params.height, params.seed, params.cfg) == (96, 64, 7, 3.0)
    assert params.loras == [LoraRef("cute_cat_lora.safetensors", 1.0), LoraRef("s/w.safetensors", 0.0)]


def test_forms_take_ascii_decimals_only(validator) -> None:
    form = validator.coerce_form({"prompt": "x", "width": " 64 ", "seed": "+42", "cfg": "1e-3", "async": "TRUE",
                                  "height": "\uff16\uff14", "priority": "1_0", "loras": '[{"name": "a"}]'})
    assert form == {"prompt": "x", "width": 64, "seed": 42, "cfg": 0.001, "async": True, "height": "\uff16\uff14",
                    "priority": "1_0", "loras": [{"name": "a"}]}
    assert refused(validator, form).extra["field"] == "height"
