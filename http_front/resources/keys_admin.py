"""Key administration: /auth/keys, /auth/generate-key, /auth/update-key, /auth/delete-key*, /auth/reload-keys."""

from __future__ import annotations

import hmac
from typing import Any

import falcon

from genserve.keyfile import KeyFileError, parse_floor, parse_weight
from http_front.errors import ApiError
from http_front.keys import InvalidKeySpec, KeyRecord, KeyStore, StoreError, check_name, hash_key, parse_permissions

ADMIN_GET = {"GET": ("admin",)}
ADMIN_POST = {"POST": ("admin",)}
NUMBER_FIELDS = ("weight", "priority_floor")  # JSON may send these as numbers


def form_fields(req: falcon.Request) -> dict[str, str]:
    """Fields of a multipart (curl -F), urlencoded or JSON body, as strings (422 for any other value)."""
    content_type = req.content_type or ""
    if not req.content_length and "chunked" not in (req.get_header("Transfer-Encoding") or ""):
        return {}
    if content_type.startswith("multipart/form-data"):
        fields = {part.name: part.get_text() or "" for part in req.get_media() if part.name}
    elif content_type.startswith(("application/x-www-form-urlencoded", "application/json")):
        try:
            media = req.get_media()
        except RecursionError:
            raise ApiError(400, "malformed request", "the body is nested too deeply") from None
        if not isinstance(media, dict):
            raise ApiError(422, "validation error", "the body must be an object of fields")
        for name in media:  # before _field_text can echo a name in its error
            _unicode(str(name))
        fields = {str(k): _field_text(str(k), v) for k, v in media.items()}
    else:
        raise ApiError(415, "unsupported media type", "send form fields (multipart or urlencoded) or JSON")
    for name, value in fields.items():
        _unicode(name + value)
    return fields


def _unicode(text: str) -> None:
    """A 422 for text that is not valid Unicode (a lone surrogate, which JSON escapes can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, "validation error", "fields must be valid Unicode text (lone surrogate)",
                       field="body") from None


def _field_text(name: str, value: Any) -> str:
    """A JSON or urlencoded value as text: a string, or (permissions only) a list of strings."""
    if isinstance(value, str):
        return value
    if name == "permissions" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if name in NUMBER_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    expected = "a string or a list of strings" if name == "permissions" else "a string"
    raise ApiError(422, "validation error", f"{name}: must be {expected}", field=name)


def required(fields: dict[str, str], name: str) -> str:
    """A non-empty field or a 422 naming it."""
    value = (fields.get(name) or "").strip()
    if not value:
        raise ApiError(422, "validation error", f"{name}: field required", field=name)
    return value


def scheduling(fields: dict[str, str]) -> tuple[float | None, int | None, bool]:
    """Optional `weight` and `priority_floor` fields (422 naming a bad one); True when the floor is `default`."""
    weight = floor = None
    reset = False
    try:
        if (fields.get("weight") or "").strip():
            weight = parse_weight(fields["weight"])
    except InvalidKeySpec as exc:
        raise ApiError(422, "validation error", f"weight: {exc}", field="weight") from None
    text = (fields.get("priority_floor") or "").strip()
    if text == "default":
        reset = True
    elif text:
        try:
            floor = parse_floor(text)
        except InvalidKeySpec as exc:
            raise ApiError(422, "validation error", f"priority_floor: {exc} (or 'default')",
                           field="priority_floor") from None
    return weight, floor, reset


def deleted_view(records: list[KeyRecord]) -> list[dict[str, Any]]:
    """What delete endpoints report about the keys they removed."""
    return [{"key_id": r.key_id, "key_preview": r.key_preview, "name": r.name,
             "permissions": list(r.permissions)} for r in records]


class _Admin:
    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    def _delete(self, resp: falcon.Response, match: Any, what: str, unique: bool = False) -> None:
        try:
            deleted = self.keys.delete(match, what, unique)
        except StoreError as exc:
            raise ApiError(exc.status, "cannot delete key", str(exc)) from None
        except KeyFileError as exc:
            raise ApiError(500, "key file error", str(exc)) from None
        resp.media = {"success": True, "message": f"成功删除 {len(deleted)} 个API密钥",
                      "deleted_keys": deleted_view(deleted)}


class Keys(_Admin):
    """GET /auth/keys: every key, previews only."""

    auth = ADMIN_GET

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """List keys."""
        listing = [r.listing(self.keys.default_floor) for r in self.keys.records()]
        resp.media = {"success": True, "keys": listing, "total": len(listing)}


class GenerateKey(_Admin):
    """POST /auth/generate-key: a new random key, shown once."""

    auth = ADMIN_POST

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Create a key from `name` and `permissions`."""
        fields = form_fields(req)
        name = required(fields, "name")
        try:
            name = check_name(name)
        except InvalidKeySpec as exc:
            raise ApiError(422, "validation error", f"name: {exc}", field="name") from None
        try:
            # Required here (the guide always sends it): an omitted field must not mean `all`.
            permissions = parse_permissions(required(fields, "permissions"), empty_means_all=False)
        except InvalidKeySpec as exc:
            raise ApiError(422, "validation error", f"permissions: {exc}", field="permissions") from None
        weight, floor, _ = scheduling(fields)
        try:
            raw, record = self.keys.create(name, permissions, 1.0 if weight is None else weight, floor)
        except StoreError as exc:
            raise ApiError(exc.status, "cannot create key", str(exc)) from None
        except KeyFileError as exc:
            raise ApiError(500, "key file error", str(exc)) from None
        perms = ",".join(record.permissions)
        resp.status = 201
        resp.media = {"success": True, "api_key": raw, "key_id": record.key_id, "name": record.name,
                      "permissions": list(record.permissions), "config_string": f"{raw}:{record.name}:{perms}",
                      "weight": record.weight, "priority_floor": record.floor(self.keys.default_floor),
                      "message": "请妥善保存此密钥: 它只显示这一次"}


class UpdateKey(_Admin):
    """POST /auth/update-key: a file key's fair-share weight and priority floor."""

    auth = ADMIN_POST

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Change `weight` and/or `priority_floor` of the key named by `key_id`."""
        fields = form_fields(req)
        key_id = required(fields, "key_id")
        weight, floor, reset = scheduling(fields)
        if weight is None and floor is None and not reset:
            raise ApiError(422, "validation error", "send weight, priority_floor or both", field="weight")
        try:
            record = self.keys.schedule(key_id, weight, floor, reset)
        except StoreError as exc:
            raise ApiError(exc.status, "cannot change key", str(exc)) from None
        except KeyFileError as exc:
            raise ApiError(500, "key file error", str(exc)) from None
        resp.media = {"success": True, "key": record.listing(self.keys.default_floor)}


class DeleteKey(_Admin):
    """POST /auth/delete-key: by the full key."""

    auth = ADMIN_POST

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Delete by `api_key`."""
        digest = hash_key(required(form_fields(req), "api_key"))
        self._delete(resp, lambda r: hmac.compare_digest(r.key_hash, digest), "this key")


class DeleteKeyById(_Admin):
    """POST /auth/delete-key-by-id: by first8-last4."""

    auth = ADMIN_POST

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Delete by `key_id`; a key_id two keys share deletes neither (409)."""
        key_id = required(form_fields(req), "key_id")
        self._delete(resp, lambda r: r.key_id == key_id, f"key_id {key_id!r}", unique=True)


class DeleteKeyByName(_Admin):
    """POST /auth/delete-key-by-name: every file key with that name."""

    auth = ADMIN_POST

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Delete by `name`."""
        name = required(form_fields(req), "name")
        self._delete(resp, lambda r: r.name == name, f"name {name!r}")


class ReloadKeys(_Admin):
    """POST /auth/reload-keys: re-read the key file."""

    auth = ADMIN_POST

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Reload; a file that cannot be read leaves the current keys in place."""
        try:
            total = self.keys.reload()
        except KeyFileError as exc:
            raise ApiError(500, "key file error", f"{exc}; the keys in use were kept") from None
        resp.media = {"success": True, "message": "API密钥已重新加载", "total_keys": total}


def install(app: falcon.App, keys: KeyStore) -> None:
    """Add the /auth routes."""
    app.add_route("/auth/keys", Keys(keys))
    app.add_route("/auth/generate-key", GenerateKey(keys))
    app.add_route("/auth/update-key", UpdateKey(keys))
    app.add_route("/auth/delete-key", DeleteKey(keys))
    app.add_route("/auth/delete-key-by-id", DeleteKeyById(keys))
    app.add_route("/auth/delete-key-by-name", DeleteKeyByName(keys))
    app.add_route("/auth/reload-keys", ReloadKeys(keys))
