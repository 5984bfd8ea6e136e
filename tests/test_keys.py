"""Key parsing, the key store and the encrypted key file (no sockets)."""

from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from genserve.keyfile import KeyFile, KeyFileError, derive_fernet_key, make_fernet
from http_front.keys import (
    DEFAULT_KEY,
    InvalidKeySpec,
    KeyRecord,
    KeyStore,
    StoreError,
    hash_key,
    key_id_of,
    owner_of,
    parse_env_keys,
    parse_permissions,
    preview_of,
    weak_keys,
)

LEGACY = {
    "legacy-admin-key-0123456789abcdef": {"name": "ops", "permissions": ["admin"], "created_at": 1.0,
                                          "last_used": None, "usage_count": 3},
    "short": {"name": "old", "permissions": ["generation", "readonly"], "created_at": 2.0,
              "last_used": None, "usage_count": 0},
}


def test_env_keys_any_n_trimmed_and_missing_permissions_mean_all() -> None:
    env = {"API_KEY_12": " k12 : twelve : generation , readonly ", "API_KEY_1": "k1:one",
           "API_KEY_3": "k3", "API_KEY_X": "ignored:x", "OTHER": "a:b:c"}
    assert parse_env_keys(env) == [("k1", "one", ("all",)), ("k3", "key3", ("all",)),
                                   ("k12", "twelve", ("generation", "readonly"))]
    with pytest.raises(InvalidKeySpec):
        parse_env_keys({"API_KEY_1": "k:n:superuser"})


def test_default_key_works_until_an_admin_capable_key_exists() -> None:
    assert KeyStore.from_env([], DEFAULT_KEY).authenticate(DEFAULT_KEY).source == "default"
    # A non-admin key alone does not switch the default key off (guide 1.7 then 1.8.x on a fresh install).
    user_only = KeyStore.from_env([("abc123def456", "dev", ("generation",))], DEFAULT_KEY)
    assert user_only.authenticate(DEFAULT_KEY).source == "default" and user_only.uses_default
    store = KeyStore.from_env([("abc123def456", "dev", ("generation",)), ("adm1n-key-0001", "ops", ("admin",))],
                              DEFAULT_KEY)
    assert store.authenticate(DEFAULT_KEY) is None and not store.uses_default
    principal = store.authenticate("abc123def456")
    assert principal.name == "dev" and principal.permissions == ("generation",)


def test_listings_never_show_a_whole_key() -> None:
    for raw in ("abc123def456", "x" * 16, "gs-" + "y" * 43):
        record = KeyRecord.from_raw(raw, "n", ("all",), "environment")
        listing = json.dumps(record.listing())
        assert raw not in listing and record.key_hash not in listing
    assert key_id_of("gs-ABCDEFGHIJKLMNOPQRSTUVWXYZ") == "gs-ABCDE-WXYZ"
    assert preview_of("gs-ABCDEFGHIJKLMNOPQRSTUVWXYZ") == "gs-ABCDE...WXYZ"


def keyfile(tmp_path: Path, key: str | None = None) -> KeyFile:
    return KeyFile(tmp_path / "api_keys.enc", make_fernet(key or Fernet.generate_key().decode(), DEFAULT_KEY))


def test_created_keys_are_stored_hashed_atomically_with_mode_0600(tmp_path: Path) -> None:
    kf = keyfile(tmp_path)
    store = KeyStore.from_env([("envadmin", "root", ("admin",))], None, kf)
    raw, record = store.create("alice", ("generation",))
    assert raw.startswith("gs-") and len(raw) >= 40
    assert stat.S_IMODE(kf.path.stat().st_mode) == 0o600
    plain = kf.fernet.decrypt(kf.path.read_bytes()).decode()
    assert raw not in plain and hash_key(raw) in plain and "alice" in plain
    assert store.authenticate(raw).name == "alice"
    again = KeyStore.from_env([], None, KeyFile(kf.path, kf.fernet))  # as a restarted front
    assert again.authenticate(raw).permissions == ("generation",)
    assert list(tmp_path.glob(".api_keys.*")) == []  # no temp file left behind


def test_plaintext_legacy_json_is_migrated_and_removed(tmp_path: Path) -> None:
    (tmp_path / "api_keys.json").write_text(json.dumps(LEGACY))
    kf = keyfile(tmp_path)
    store = KeyStore.from_env([], DEFAULT_KEY, kf)
    assert not (tmp_path / "api_keys.json").exists() and kf.path.exists()
    assert store.authenticate("legacy-admin-key-0123456789abcdef").name == "ops"
    assert store.authenticate("short").permissions == ("generation", "readonly")
    assert store.authenticate(DEFAULT_KEY) is None
    assert "legacy-admin-key" not in kf.fernet.decrypt(kf.path.read_bytes()).decode()


@pytest.mark.parametrize("explicit", [False, True])
def test_legacy_encrypted_file_opens_and_is_rewritten(tmp_path: Path, explicit: bool) -> None:
    key = Fernet.generate_key().decode() if explicit else None
    legacy_key = key or derive_fernet_key("my-old-default-key")
    (tmp_path / "api_keys.enc").write_bytes(Fernet(legacy_key).encrypt(json.dumps(LEGACY).encode()))
    kf = KeyFile(tmp_path / "api_keys.enc", make_fernet(key, "my-old-default-key"))
    store = KeyStore.from_env([], DEFAULT_KEY, kf)
    assert store.authenticate("legacy-admin-key-0123456789abcdef").permissions == ("admin",)
    content = json.loads(kf.fernet.decrypt(kf.path.read_bytes()))
    assert content["version"] == 2 and "short" not in json.dumps(content)


def test_derivation_matches_the_earlier_implementation() -> None:
    # PBKDF2-HMAC-SHA256, 100,000 iterations, salt genserve_salt_2024, of the default literal.
    assert derive_fernet_key(DEFAULT_KEY) == derive_fernet_key("genserve-default-key-2024")
    assert len(derive_fernet_key(DEFAULT_KEY)) == 44 and derive_fernet_key("a") != derive_fernet_key("b")


@pytest.mark.parametrize("damage", ["wrong key", "corrupted", "not json", "wrong length"])
def test_unreadable_files_are_refused_and_left_byte_for_byte(tmp_path: Path, damage: str) -> None:
    good = Fernet.generate_key().decode()
    path = tmp_path / "api_keys.enc"
    path.write_bytes(Fernet(good).encrypt(json.dumps(LEGACY).encode()))
    if damage == "corrupted":
        path.write_bytes(path.read_bytes()[:-7] + b"AAAAAAA")
    elif damage == "not json":
        path.write_bytes(Fernet(good).encrypt(b"[not, json"))
    before = path.read_bytes()
    key = {"wrong key": Fernet.generate_key().decode(), "wrong length": good[:40]}.get(damage, good)
    with pytest.raises(KeyFileError):
        KeyStore.from_env([], DEFAULT_KEY, KeyFile(path, make_fernet(key, DEFAULT_KEY)))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["api_keys.enc"]


def test_concurrent_creation_from_threads_and_two_fronts_loses_nothing(tmp_path: Path) -> None:
    kf_key = Fernet.generate_key().decode()
    fronts = [KeyStore.from_env([("envadmin", "root", ("admin",))], None,
                                KeyFile(tmp_path / "api_keys.enc", make_fernet(kf_key, DEFAULT_KEY)))
              for _ in range(2)]
    created: list[str] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        raw, _ = fronts[i % 2].create(f"user{i}", ("generation",))
        with lock:
            created.append(raw)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = KeyStore.from_env([], None, KeyFile(tmp_path / "api_keys.enc", make_fernet(kf_key, DEFAULT_KEY)))
    assert len(created) == 24 and all(fresh.authenticate(raw) for raw in created)


def test_other_fronts_see_changes_automatically(tmp_path: Path) -> None:
    key = Fernet.generate_key().decode()
    now = [0.0]
    a = KeyStore(keyfile=KeyFile(tmp_path / "api_keys.enc", make_fernet(key, DEFAULT_KEY)),
                 env_records=[KeyRecord.from_raw("envadmin", "root", ("admin",), "environment")])
    b = KeyStore(keyfile=KeyFile(tmp_path / "api_keys.enc", make_fernet(key, DEFAULT_KEY)),
                 env_records=[KeyRecord.from_raw("envadmin", "root", ("admin",), "environment")],
                 clock=lambda: now[0])
    raw, _ = a.create("bob", ("readonly",))
    now[0] += 2  # past the once-a-second check
    assert b.authenticate(raw).name == "bob"
    a.delete(lambda r: r.name == "bob", "bob")
    now[0] += 2
    assert b.authenticate(raw) is None


def test_delete_rules(tmp_path: Path) -> None:
    store = KeyStore.from_env([("envadmin", "root", ("admin",))], None, keyfile(tmp_path))
    raw, rec = store.create("carol", ("all",))
    with pytest.raises(StoreError) as err:
        store.delete(lambda r: r.name == "root", "root")
    assert err.value.status == 403
    with pytest.raises(StoreError) as err:
        store.delete(lambda r: r.name == "nobody", "nobody")
    assert err.value.status == 404
    assert [r.key_id for r in store.delete(lambda r: r.key_id == rec.key_id, "id")] == [rec.key_id]
    assert store.authenticate(raw) is None


def test_the_last_admin_key_cannot_be_deleted_and_default_key_cannot_lock_out(tmp_path: Path) -> None:
    store = KeyStore.from_env([], DEFAULT_KEY, keyfile(tmp_path))
    first_raw, _ = store.create("first user", ("generation", "readonly"))
    assert store.authenticate(DEFAULT_KEY).source == "default"  # nobody can administer yet
    store.delete(lambda r: r.name == "first user", "first user")  # with the default key still working
    assert store.authenticate(first_raw) is None and store.authenticate(DEFAULT_KEY) is not None
    admin_raw, _ = store.create("admin", ("admin",))
    assert store.authenticate(DEFAULT_KEY) is None  # a real key exists now
    user_raw, _ = store.create("user", ("generation",))
    with pytest.raises(StoreError) as err:
        store.delete(lambda r: r.name == "admin", "admin")
    assert err.value.status == 409
    assert store.authenticate(admin_raw) and store.authenticate(user_raw)


def test_weak_keys_names_the_environment_keys_short_enough_to_guess() -> None:
    guide = {"API_KEY_1": "abc123def456:developer:generation,readonly", "API_KEY_2": "xyz789ghi012:user:generation",
             "API_KEY_3": "admin123admin456:admin:all", "API_KEY_4": "gs-" + "q" * 40 + ":strong:admin",
             "API_KEY_5": "exactly-twenty-chars:edge:readonly"}
    assert weak_keys(parse_env_keys(guide)) == ["developer", "user", "admin"]
    assert weak_keys([]) == []


def test_owner_is_unique_where_key_id_is_not() -> None:
    a, b = "gs-SAME1" + "a" * 30 + "TAIL", "gs-SAME1" + "b" * 30 + "TAIL"
    assert key_id_of(a) == key_id_of(b) and owner_of(a) != owner_of(b)
    store = KeyStore.from_env([(a, "a", ("generation",)), (b, "b", ("generation",))], None)
    pa, pb = store.authenticate(a), store.authenticate(b)
    assert pa.key_id == pb.key_id and (pa.owner, pb.owner) == (owner_of(a), owner_of(b))
    assert KeyRecord.from_raw(a, "a", ("all",), "file").owner == owner_of(a)
    assert "owner" not in KeyRecord.from_raw(a, "a", ("all",), "file").listing()


def test_delete_by_a_shared_key_id_deletes_nothing(tmp_path: Path) -> None:
    a, b = "gs-SAME1" + "a" * 30 + "TAIL", "gs-SAME1" + "b" * 30 + "TAIL"
    kf = keyfile(tmp_path)
    kf.update(lambda current: current + [KeyRecord.from_raw(a, "a", ("readonly",), "file"),
                                         KeyRecord.from_raw(b, "b", ("readonly",), "file")])
    store = KeyStore.from_env([("envadmin", "root", ("admin",))], None, kf)
    with pytest.raises(StoreError) as err:
        store.delete(lambda r: r.key_id == key_id_of(a), "id", unique=True)
    assert err.value.status == 409
    assert store.authenticate(a) and store.authenticate(b)
    assert len(store.delete(lambda r: r.key_id == key_id_of(a), "id")) == 2  # without `unique`: every match


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "a\x00b", "a\nb", "tab\there", "\x1b[31mred",
                                  "a\u2028b", "a\u202eb", "\ud800", "x:admin"])
def test_created_key_names_are_printable_text(tmp_path: Path, name: str) -> None:
    store = KeyStore.from_env([("envadmin", "root", ("admin",))], None, keyfile(tmp_path))
    with pytest.raises(StoreError) as err:
        store.create(name, ("readonly",))
    assert err.value.status == 422 and "name" in str(err.value)
    assert [r.name for r in store.records()] == ["root"]


def test_created_key_names_keep_unicode_text(tmp_path: Path) -> None:
    store = KeyStore.from_env([("envadmin", "root", ("admin",))], None, keyfile(tmp_path))
    for name in ("新用户", "  padded  ", "Ünïcode user 😀"):
        raw, record = store.create(name, ("readonly",))
        assert record.name == name.strip() and store.authenticate(raw).name == name.strip()


def test_permissions_may_be_required() -> None:
    assert parse_permissions("") == ("all",)  # API_KEY_N without permissions: the legacy meaning
    for empty in ("", " , ", []):
        with pytest.raises(InvalidKeySpec):
            parse_permissions(empty, empty_means_all=False)
    assert parse_permissions("readonly", empty_means_all=False) == ("readonly",)


def test_scheduling_fields_are_written_only_when_set_and_checked_when_read(tmp_path: Path) -> None:
    kf = keyfile(tmp_path)
    store = KeyStore.from_env([("envadmin", "root", ("admin",))], None, kf)
    store.create("plain", ("generation",))
    store.create("batch", ("generation",), weight=0.5, priority_floor=7)
    data = json.loads(kf.fernet.decrypt(kf.path.read_bytes()))
    by_name = {item["name"]: item for item in data["keys"]}
    assert "weight" not in by_name["plain"] and "priority_floor" not in by_name["plain"]  # older fronts read it
    assert (by_name["batch"]["weight"], by_name["batch"]["priority_floor"]) == (0.5, 7)
    by_name["plain"]["from_a_newer_version"] = True  # fields this version does not know are skipped
    kf.path.write_bytes(kf.fernet.encrypt(json.dumps(data).encode()))
    again = KeyStore.from_env([], None, KeyFile(kf.path, kf.fernet), default_floor=-5)
    floors = {r.name: r.floor(again.default_floor) for r in again.records()}
    assert floors == {"plain": -5, "batch": 7}
    for bad in ({"weight": 0}, {"weight": "NaN"}, {"priority_floor": 5000}, {"priority_floor": "--5"}):
        damaged = json.loads(json.dumps(data))
        damaged["keys"][0].update(bad)
        kf.path.write_bytes(kf.fernet.encrypt(json.dumps(damaged).encode()))
        with pytest.raises(KeyFileError, match="in the key file"):
            KeyFile(kf.path, kf.fernet).load()


def test_a_keys_principal_follows_changes_to_its_weight_and_floor(tmp_path: Path) -> None:
    store = KeyStore.from_env([("envadmin", "root", ("admin",))], None, keyfile(tmp_path))
    raw, record = store.create("batch", ("generation",))
    first = store.authenticate(raw)
    assert (first.weight, first.priority_floor) == (1.0, store.default_floor)
    assert store.authenticate(raw) == first
    store.schedule(record.key_id, 0.25, 3)
    assert (store.authenticate(raw).weight, store.authenticate(raw).priority_floor) == (0.25, 3)
    store.schedule(record.key_id, None, None, reset_floor=True)
    assert (store.authenticate(raw).weight, store.authenticate(raw).priority_floor) == (0.25, store.default_floor)
