"""`genservectl keys ...` (through a front's admin API) and `genservectl crypto-key`."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import click
from cryptography.fernet import Fernet

from genserve.keyfile import DEFAULT_KEY

DEFAULT_URL = "http://127.0.0.1:12411"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib would send the Authorization header on to wherever they point."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        """Never follow."""
        return None


OPENER = urllib.request.build_opener(_NoRedirect)  # every genservectl request to a front goes through it


def call(url: str, key: str, method: str, path: str, fields: dict[str, str] | None = None,
         timeout: float = 10.0) -> dict[str, Any]:
    """One admin API call; raises ClickException with the server's message on failure."""
    data = urllib.parse.urlencode(fields).encode() if fields is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {key}"})
    if data is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with OPENER.open(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read().decode("utf-8"))
            message = body.get("detail") or body.get("error") or str(body)
        except ValueError:
            message = exc.reason
        raise click.ClickException(f"{exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None


url_option = click.option("--url", envvar="GENSERVE_URL", default=DEFAULT_URL, show_default=True,
                          help="front base URL (env GENSERVE_URL)")
key_option = click.option("--admin-key", envvar="GENSERVE_ADMIN_KEY", required=True,
                          help="an admin API key (env GENSERVE_ADMIN_KEY)")
json_option = click.option("--json", "as_json", is_flag=True, help="print JSON")


@click.group("keys")
def keys() -> None:
    """API keys, through a front's admin API."""


@keys.command("list")
@url_option
@key_option
@json_option
def list_keys(url: str, admin_key: str, as_json: bool) -> None:
    """Every key (previews only)."""
    body = call(url, admin_key, "GET", "/auth/keys")
    if as_json:
        click.echo(json.dumps(body["keys"], indent=2, ensure_ascii=False))
        return
    rows = [("KEY ID", "PREVIEW", "NAME", "PERMISSIONS", "SOURCE", "USES", "WEIGHT", "FLOOR")]
    rows += [(k["key_id"], k["key_preview"], k["name"], ",".join(k["permissions"]), k["source"],
              str(k["usage_count"]), f"{k.get('weight', 1):g}", str(k.get("priority_floor", "-")))
             for k in body["keys"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


weight_option = click.option("--weight", help="fair share against other keys at one priority (0.01-100; default 1)")
floor_option = click.option("--priority-floor", help="most urgent priority the key may use (default 0; admins any)")


def _scheduling(weight: str | None, floor: str | None) -> dict[str, str]:
    return {k: v for k, v in (("weight", weight), ("priority_floor", floor)) if v is not None}


@keys.command("create")
@click.argument("name")
@click.option("--permissions", default="generation,readonly", show_default=True)
@weight_option
@floor_option
@url_option
@key_option
@json_option
def create(name: str, permissions: str, weight: str | None, priority_floor: str | None, url: str, admin_key: str,
           as_json: bool) -> None:
    """Create a key for NAME; the key is printed once."""
    body = call(url, admin_key, "POST", "/auth/generate-key",
                {"name": name, "permissions": permissions, **_scheduling(weight, priority_floor)})
    if as_json:
        click.echo(json.dumps(body, indent=2, ensure_ascii=False))
    else:
        click.echo(f"api_key: {body['api_key']}\nkey_id:  {body['key_id']}\nconfig:  {body['config_string']}")
        click.echo("Store it now: it is never shown again.", err=True)


@keys.command("update")
@click.argument("key_id")
@weight_option
@click.option("--priority-floor", help="most urgent priority the key may use, or 'default'")
@url_option
@key_option
@json_option
def update(key_id: str, weight: str | None, priority_floor: str | None, url: str, admin_key: str,
           as_json: bool) -> None:
    """Change the fair-share weight and/or priority floor of the file key KEY_ID."""
    if weight is None and priority_floor is None:
        raise click.UsageError("give --weight, --priority-floor or both")
    body = call(url, admin_key, "POST", "/auth/update-key", {"key_id": key_id, **_scheduling(weight, priority_floor)})
    key = body["key"]
    if as_json:
        click.echo(json.dumps(key, indent=2, ensure_ascii=False))
    else:
        click.echo(f"{key['key_id']} ({key['name']}): weight {key['weight']:g}, priority floor {key['priority_floor']}")


@keys.command("delete")
@click.option("--key", "api_key", help="the full key")
@click.option("--id", "key_id", help="first8-last4 key id")
@click.option("--name", help="every file key with this name")
@url_option
@key_option
@json_option
def delete(api_key: str | None, key_id: str | None, name: str | None, url: str, admin_key: str,
           as_json: bool) -> None:
    """Delete a key by --key, --id or --name (exactly one)."""
    given = [(p, f, v) for p, f, v in (("/auth/delete-key", "api_key", api_key),
                                       ("/auth/delete-key-by-id", "key_id", key_id),
                                       ("/auth/delete-key-by-name", "name", name)) if v]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --key, --id, --name")
    path, field, value = given[0]
    body = call(url, admin_key, "POST", path, {field: value})
    if as_json:
        click.echo(json.dumps(body, indent=2, ensure_ascii=False))
    else:
        for k in body["deleted_keys"]:
            click.echo(f"deleted {k['key_id']} ({k['name']})")


@keys.command("reload")
@url_option
@key_option
def reload(url: str, admin_key: str) -> None:
    """Make the front re-read the key file."""
    body = call(url, admin_key, "POST", "/auth/reload-keys")
    click.echo(f"reloaded: {body['total_keys']} keys")


encryption_key_option = click.option("--encryption-key", envvar="API_KEYS_ENCRYPTION_KEY", default=None,
                                     help="Fernet key of the key file (env API_KEYS_ENCRYPTION_KEY)")
default_key_option = click.option("--default-api-key", envvar="DEFAULT_API_KEY", default=DEFAULT_KEY,
                                  help="the legacy derivation's password (env DEFAULT_API_KEY)")


@keys.command("check")
@click.option("--key-file", envvar="API_KEYS_FILE", default="api_keys.enc", show_default=True,
              type=click.Path(path_type=Path))
@click.option("--allow-missing", is_flag=True, help="a key file that does not exist yet is not an error")
@encryption_key_option
@default_key_option
def check(key_file: Path, allow_missing: bool, encryption_key: str | None, default_api_key: str) -> None:
    """Check the encryption key, then open the key file with it and report (changes nothing)."""
    from genserve.keyfile import KeyFile, KeyFileError, make_fernet

    try:
        fernet = make_fernet(encryption_key or None, default_api_key)
        probe = b"genserve-encryption-self-check"
        if fernet.decrypt(fernet.encrypt(probe)) != probe:
            raise click.ClickException("the encryption key does not round-trip a token")
        click.echo("encryption key: ok (Fernet round trip)")
        if not key_file.exists():
            if allow_missing:
                click.echo(f"{key_file}: not created yet (the first generate-key creates it)")
                return
            raise click.ClickException(f"{key_file} does not exist")

        records, legacy = KeyFile(key_file, fernet).inspect()
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    mode = oct(key_file.stat().st_mode & 0o777)
    click.echo(f"{key_file}: {len(records)} keys, {'legacy format (migrated at next start)' if legacy else 'format 2'},"
               f" mode {mode}")
    if key_file.stat().st_mode & 0o077:
        click.echo("warning: the file is readable by other users; chmod 600 it", err=True)


@click.command("crypto-key")
@click.option("--method", type=click.Choice(["random", "password", "default-key"]), default="random",
              show_default=True, help="random key; PBKDF2 from a password; PBKDF2 from DEFAULT_API_KEY")
@click.option("--password", help="with --method password (prompted when omitted)")
@default_key_option
def crypto_key(method: str, password: str | None, default_api_key: str) -> None:
    """Print an `export API_KEYS_ENCRYPTION_KEY=...` line for the key file."""
    from genserve.keyfile import derive_fernet_key

    if method == "random":
        key = Fernet.generate_key().decode("ascii")
    elif method == "password":
        if password is None:
            password = click.prompt("password", hide_input=True, confirmation_prompt=True)
        if len(password) < 12:
            raise click.ClickException("use a password of at least 12 characters")
        key = derive_fernet_key(password)
    else:
        key = derive_fernet_key(default_api_key)
        click.echo("note: derived from DEFAULT_API_KEY, which is only as secret as that key", err=True)
    click.echo(f"export API_KEYS_ENCRYPTION_KEY={key}")
