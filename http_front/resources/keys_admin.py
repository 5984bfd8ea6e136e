"""Key administration: /auth/keys, /auth/generate-key, /auth/delete-key*, /auth/reload-keys."""

from __future__ import annotations

import hmac
from typing import Any

import falcon

from http_front.errors import ApiError
from http_front.keyfile import KeyFileError
from http_front.keys import InvalidKeySpec, KeyRecord, KeyStore, StoreError, hash_key, parse_permissions

ADMIN_GET = {"GET": ("admin",)}
ADMIN_POST = {"POST": ("admin",)}


def form_fields(req: falcon.Request) -> dict[str, str]:
    """Fields of a multipart (curl -F), urlencoded or JSON body, as strings."""
    content_type = req.content_type or ""
    if not req.content_length and "chunked" not in (req.get_header("Transfer-Encoding") or ""):
        return {}
    if content_type.startswith("multipart/form-data"):
        return {part.name: part.get_text() or "" for part in req.get_media() if part.name}
    if content_type.startswith(("application/x-www-form-urlencoded", "application/json")):
        media = req.get_media()
        if not isinstance(media, dict):
            raise ApiError(422, "validation error", "the body must be an object of fields")
        return {str(k): v if isinstance(v, str) else ",".join(v) if isinstance(v, list) else str(v)
                for k, v in media.items()}
    raise ApiError(415, "unsupported media type", "send form fields (multipart or urlencoded) or JSON")


def required(fields: dict[str, str], name: str) -> str:
    """A non-empty field or a 422 naming it."""
    value = (fields.get(name) or "").strip()
    if not value:
        raise ApiError(422, "validation error", f"{name}: field required", field=name)
    return value


def deleted_view(records: list[KeyRecord]) -> list[dict[str, Any]]:
    """What delete endpoints report about the keys they removed."""
    return [{"key_id": r.key_id, "key_preview": r.key_preview, "name": r.name,
             "permissions": list(r.permissions)} for r in records]


class _Admin:
    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    def _delete(self, resp: falcon.Response, match: Any, what: str) -> None:
        try:
            deleted = self.keys.delete(match, what)
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
        listing = [r.listing() for r in self.keys.records()]
        resp.media = {"success": True, "keys": listing, "total": len(listing)}


class GenerateKey(_Admin):
    """POST /auth/generate-key: a new random key, shown once."""

    auth = ADMIN_POST

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Create a key from `name` and `permissions`."""
        fields = form_fields(req)
        try:
            permissions = parse_permissions(fields.get("permissions", ""))
            raw, record = self.keys.create(required(fields, "name"), permissions)
        except InvalidKeySpec as exc:
            raise ApiError(422, "validation error", f"permissions: {exc}", field="permissions") from None
        except StoreError as exc:
            raise ApiError(exc.status, "cannot create key", str(exc)) from None
        except KeyFileError as exc:
            raise ApiError(500, "key file error", str(exc)) from None
        perms = ",".join(record.permissions)
        resp.status = 201
        resp.media = {"success": True, "api_key": raw, "key_id": record.key_id, "name": record.name,
                      "permissions": list(record.permissions), "config_string": f"{raw}:{record.name}:{perms}",
                      "message": "请妥善保存此密钥: 它只显示这一次"}


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
        """Delete by `key_id`."""
        key_id = required(form_fields(req), "key_id")
        self._delete(resp, lambda r: r.key_id == key_id, f"key_id {key_id!r}")


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
    app.add_route("/auth/delete-key", DeleteKey(keys))
    app.add_route("/auth/delete-key-by-id", DeleteKeyById(keys))
    app.add_route("/auth/delete-key-by-name", DeleteKeyByName(keys))
    app.add_route("/auth/reload-keys", ReloadKeys(keys))
