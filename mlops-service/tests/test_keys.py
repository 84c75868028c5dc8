"""The keys and what each grants (mlops/keys.py), by direct calls.

tests/test_tenant_keys.py runs keys files through the service and
``Settings``; tests/test_auth.py the variables. Here: ``parse_keys`` and
``load_keys_file`` entry by entry (each refusal one line naming the entry,
never the key), :class:`Grant`, :class:`Keyring`, and ``auth_settings`` on
the values ``mlops.config`` hands it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from mlops.keys import (
    FULL_GRANT,
    MAX_BUSINESSES,
    MAX_KEYS,
    MAX_KEYS_FILE_BYTES,
    READ_GRANT,
    Grant,
    Keyring,
    KeysFileError,
    KeySpec,
    auth_settings,
    load_keys_file,
    parse_keys,
)

KEY = "keys-test-key-0123456789"  # 24 characters
OTHER = "keys-other-key-abcdefghij"
FULL = "keys-full-key-0123456789ab"
READ = "keys-read-key-0123456789ab"
SECRETS = (KEY, OTHER, FULL, READ)
HINT = "; make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def parsed(text: str, folder: Path = Path("/nonexistent")) -> tuple[KeySpec, ...]:
    return parse_keys(text, folder)


def refusal(text: str, folder: Path = Path("/nonexistent")) -> str:
    with pytest.raises(KeysFileError) as refused:
        parse_keys(text, folder)
    message = str(refused.value)
    assert "\n" not in message and not any(secret in message for secret in SECRETS)
    return message


def entry(body: str, *, key: str = KEY) -> str:
    return f'[[key]]\nkey = "{key}"\n{body}\n'


def test_an_entry_without_businesses_reaches_every_business():
    (spec,) = parsed(entry('scopes = ["write", "read"]'))
    assert spec.key == KEY
    assert spec.grant == Grant(frozenset({"write", "read"}))
    assert spec.grant.limited_to("write") is None and spec.grant.limited_to("erase") is None
    assert spec.grant.expires_at is None and spec.grant.name is None
    assert KEY not in repr(spec)


def test_one_list_of_businesses_limits_every_scope():
    (spec,) = parsed(entry('name = "acme"\nscopes = ["read", "erase", "read"]\n'
                           'businesses = ["acme", "acme-2", "acme"]'))
    assert spec.grant.scopes == {"read", "erase"}
    assert dict(spec.grant.businesses) == {"read": {"acme", "acme-2"},
                                           "erase": {"acme", "acme-2"}}
    assert spec.grant.limited_to("write") is None
    assert spec.grant.name == "acme"


def test_businesses_per_scope():
    (spec,) = parsed(entry('scopes = ["write", "read"]\n'
                           'businesses = { write = ["p-1"], read = ["p-1", "p-2"] }'))
    assert spec.grant.limited_to("write") == {"p-1"}
    assert spec.grant.limited_to("read") == {"p-1", "p-2"}
    assert spec.grant.describe() == {"name": None, "scopes": ["write", "read"],
                                     "businesses": {"write": ["p-1"], "read": ["p-1", "p-2"]},
                                     "expires_at": None}


@pytest.mark.parametrize(("written", "instant"), [
    ("2027-01-01T00:00:00Z", datetime(2027, 1, 1, tzinfo=UTC)),
    ("2027-01-01T02:00:00+02:00", datetime(2027, 1, 1, tzinfo=UTC)),
    ("2026-12-31T19:30:00-04:30", datetime(2027, 1, 1, tzinfo=UTC)),
    ('"2027-01-01T00:00:00Z"', datetime(2027, 1, 1, tzinfo=UTC)),  # a string is read too
])
def test_an_expiry_with_its_offset_is_one_instant(written, instant):
    (spec,) = parsed(entry(f'scopes = ["read"]\nexpires_at = {written}'))
    grant = spec.grant
    assert grant.expires_at == instant
    assert not grant.expired(instant - timedelta(microseconds=1))
    assert grant.expired(instant)  # at the instant: expired
    assert grant.expired(instant.astimezone(timezone(timedelta(hours=-9))))
    assert grant.expires_at.utcoffset() is not None


def test_describe_keeps_the_offset_written():
    (spec,) = parsed(entry('scopes = ["read"]\nexpires_at = 2027-01-01T02:00:00+02:00'))
    assert spec.grant.describe()["expires_at"] == "2027-01-01T02:00:00+02:00"


def test_a_grant_without_expiry_never_expires():
    assert not Grant(frozenset({"read"})).expired(datetime(9999, 1, 1, tzinfo=UTC))


def test_a_key_file_is_read_relative_to_the_folder_trimmed_and_without_bom(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "a.key").write_bytes(b"\xef\xbb\xbf  " + KEY.encode() + b"\r\n")
    (tmp_path / "b.key").write_text(OTHER)
    specs = parsed('[[key]]\nkey_file = "secrets/a.key"\nscopes = ["read"]\n'
                   f'[[key]]\nkey_file = "{tmp_path / "b.key"}"\nscopes = ["write"]\n',
                   tmp_path)
    assert [s.key for s in specs] == [KEY, OTHER]
    assert [s.grant.scopes for s in specs] == [{"read"}, {"write"}]


def test_a_key_is_trimmed():
    (spec,) = parsed(entry('scopes = ["read"]', key=f"  {KEY}\t"))
    assert spec.key == KEY


@pytest.mark.parametrize(("text", "message"), [
    (entry('scopes = ["read"]', key="fifteen-chars-k"),
     "key 1: the key must be at least 16 characters (it has 15)"),
    (entry('scopes = ["read"]', key="   "), "key 1: the key must be at least 16 characters "
                                              "(it has 0)"),
    ('[[key]]\nkey = "keys-test-key-01\\n23456789"\nscopes = ["read"]\n',
     "key 1: the key must not hold a line break"),
    (entry('scopes = ["read"]') + entry('name = "again"\nscopes = ["write"]'),
     "key 2 (again): the key is given again (each key once)"),
    ('[[key]]\nscopes = ["read"]\n', "key 1: give key or key_file (one of them)"),
    ('[[key]]\nkey = 123456789012345678\nscopes = ["read"]\n',
     "key 1: key: Input should be a valid string"),
    (entry(""), "key 1: scopes: Field required"),
    (entry("scopes = []"), "key 1: scopes: List should have at least 1 item after validation, "
                           "not 0"),
    (entry('scopes = "read"'), "key 1: scopes: Input should be a valid list"),
    (entry('name = "ops"\nscopes = ["admin"]'),
     "key 1 (ops): scopes.0: Input should be 'write', 'read' or 'erase'"),
    (entry('name = ""\nscopes = ["read"]'), "key 1: name: String should have at least 1 character"),
    (entry(f'name = "{"n" * 65}"\nscopes = ["read"]'),
     f"key 1 ({'n' * 65}): name: String should have at most 64 characters"),
    (entry('name = 7\nscopes = ["read"]'), "key 1: name: Input should be a valid string"),
    (entry('scopes = ["read"]\nbusinesses = "acme"'),
     "key 1: businesses: Input should be a valid list"),
    (entry('scopes = ["read"]\nbusinesses = { read = [] }'),
     "key 1: businesses.read: List should have at least 1 item after validation, not 0"),
    (entry('scopes = ["read"]\nbusinesses = { read = ["a"], admin = ["b"] }'),
     "key 1: businesses.admin: Input should be 'write', 'read' or 'erase'"),
    (entry('scopes = ["read"]\nbusinesses = { read = ["a"], write = ["b"] }'),
     "key 1: businesses lists scope 'write', which is not in scopes"),
    (entry('scopes = ["write", "erase"]\nbusinesses = { write = ["a"] }'),
     "key 1: businesses names no list for scope 'erase' (give one per scope, or one list for "
     "all)"),
    (entry(f'scopes = ["read"]\nbusinesses = ["{"b" * 256}"]'),
     "key 1: businesses.0: String should have at most 255 characters"),
    (entry('scopes = ["read"]\nexpires_at = 2027-01-01'),
     "key 1: expires_at: Input should have timezone info"),
    (entry('scopes = ["read"]\nexpires_at = "soon"'),
     "key 1: expires_at: Input should be a valid datetime or date, input is too short"),
    (entry('scopes = ["read"]\nkey_file = "x.key"'), "key 1: give key or key_file (one of them)"),
    ('[[key]]\nkey_file = "missing.key"\nscopes = ["read"]\n',
     "key 1: key_file 'missing.key' cannot be read: No such file or directory"),
    ("key = [1, 2]\n", "key 1: is not a table; write each key as [[key]]"),
    (f'key = [{{ key = "{KEY}", scopes = ["read"] }}, 7]\n',
     "key 2: is not a table; write each key as [[key]]"),
    ("", "holds no [[key]] table"),
    ("[key]\nscopes = []\n", "holds no [[key]] table"),
    ('key = "x"\n', "holds no [[key]] table"),
    ("[keys]\nscopes = []\n" + entry('scopes = ["read"]'),
     "has 'keys' at the top level; write each key as [[key]]"),
    (entry('scopes = ["read"'), "is not valid TOML: Unclosed array (at end of document)"),
    (entry('scopes = ["read"]') + 'scopes = ["write"]\n',
     "is not valid TOML: Cannot overwrite a value (at line 4, column 19)"),
])
def test_a_malformed_keys_file_is_refused_in_one_line_naming_the_entry(text, message):
    assert refusal(text) == message


def test_a_key_file_that_is_a_folder_or_not_text_is_refused(tmp_path):
    (tmp_path / "bad.key").write_bytes(b"\xff\xfe" + KEY.encode())
    assert refusal('[[key]]\nkey_file = "."\nscopes = ["read"]\n', tmp_path) == \
        "key 1: key_file '.' cannot be read: Is a directory"
    assert refusal('[[key]]\nkey_file = "bad.key"\nscopes = ["read"]\n', tmp_path) == \
        "key 1: key_file 'bad.key' is not UTF-8 text"


def test_the_number_of_keys_and_businesses_is_bounded():
    many = "".join(entry('scopes = ["read"]', key=f"keys-bulk-{i:010d}-xx")
                   for i in range(MAX_KEYS))
    assert len(parsed(many)) == MAX_KEYS
    assert refusal(many + entry('scopes = ["read"]')) == f"holds {MAX_KEYS + 1} keys, more than " \
                                                          f"{MAX_KEYS}"
    ids = ", ".join(f'"b{i}"' for i in range(MAX_BUSINESSES))
    (spec,) = parsed(entry(f'scopes = ["read"]\nbusinesses = [{ids}]'))
    assert len(spec.grant.limited_to("read")) == MAX_BUSINESSES
    assert refusal(entry(f'scopes = ["read"]\nbusinesses = [{ids}, "one-more"]')) == \
        (f"key 1: businesses: List should have at most {MAX_BUSINESSES} items after "
         f"validation, not {MAX_BUSINESSES + 1}")


def test_load_keys_file_reads_utf8_with_a_bom(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_bytes(b"\xef\xbb\xbf" + entry('scopes = ["erase"]').encode())
    (spec,) = load_keys_file(path)
    assert (spec.key, spec.grant.scopes) == (KEY, {"erase"})


def test_load_keys_file_refusals(tmp_path):
    def refused(path: Path) -> str:
        with pytest.raises(KeysFileError) as error:
            load_keys_file(path)
        return str(error.value)

    assert refused(tmp_path / "absent.toml") == "cannot be read: No such file or directory"
    assert refused(tmp_path) == "cannot be read: Is a directory"
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n" + entry('scopes = ["read"]').encode())
    assert refused(tmp_path / "latin1.toml") == "is not UTF-8 text"
    big = entry('scopes = ["read"]').encode()
    (tmp_path / "big.toml").write_bytes(big + b"#" * (MAX_KEYS_FILE_BYTES - len(big)))
    assert len(load_keys_file(tmp_path / "big.toml")) == 1  # at the limit: read
    (tmp_path / "big.toml").write_bytes(big + b"#" * (MAX_KEYS_FILE_BYTES - len(big) + 1))
    assert refused(tmp_path / "big.toml") == f"is larger than {MAX_KEYS_FILE_BYTES} bytes"


def test_describe_lists_scopes_in_order_and_businesses_sorted():
    grant = Grant(frozenset({"erase", "write"}), {"erase": frozenset({"b", "a"})},
                  datetime(2030, 5, 1, 12, tzinfo=UTC), "ops")
    assert grant.describe() == {"name": "ops", "scopes": ["write", "erase"],
                                "businesses": {"write": None, "erase": ["a", "b"]},
                                "expires_at": "2030-05-01T12:00:00+00:00"}
    assert FULL_GRANT.describe()["businesses"] == {"write": None, "read": None, "erase": None}
    assert READ_GRANT.describe()["scopes"] == ["read"]


def test_the_keyring_grants_each_key_its_own_and_nothing_to_others():
    limited = KeySpec(KEY, Grant(frozenset({"write"}), {"write": frozenset({"a"})}))
    ring = Keyring([FULL], [READ], [limited])
    assert ring.grant_for(FULL) is FULL_GRANT
    assert ring.grant_for(READ) is READ_GRANT
    assert ring.grant_for(KEY) is limited.grant
    assert ring.grant_for(OTHER) is None and ring.grant_for("") is None
    assert ring.grant_for(FULL + " ") is None and ring.grant_for(FULL[:-1]) is None
    assert ring.scopes_for(READ) == {"read"} and ring.scopes_for(OTHER) == frozenset()
    assert [(source, grant) for _, source, grant in ring.listing] == [
        ("MLOPS_API_KEY", FULL_GRANT), ("MLOPS_READ_API_KEY", READ_GRANT),
        ("MLOPS_KEYS_FILE", limited.grant)]
    assert [key_id for key_id, _, _ in ring.listing] == [ring.key_id(k) for k in
                                                          (FULL, READ, KEY)]


def test_a_key_id_is_12_hex_digits_fixed_by_the_set_of_keys():
    ring = Keyring([FULL], [READ])
    key_id = ring.key_id(FULL)
    assert len(key_id) == 12 and int(key_id, 16) >= 0 and FULL not in key_id
    assert Keyring([FULL], [READ]).key_id(FULL) == key_id  # another process, same keys
    assert Keyring([], [READ, FULL]).key_id(FULL) == key_id  # the set, not where each is
    assert Keyring([FULL], [READ, OTHER]).key_id(FULL) != key_id  # a rotation renames
    assert ring.key_id(OTHER) != key_id and len(ring.digest(OTHER)) == 32


# auth_settings, on the values as mlops.config hands them over (empty values left out).

def test_without_keys_auth_is_off():
    assert auth_settings({}) == {"MLOPS_API_KEY": (), "MLOPS_READ_API_KEY": (),
                                 "MLOPS_KEYS_FILE": (), "MLOPS_AUTH_MODE": "off",
                                 "MLOPS_METRICS_TOKEN": None}
    assert auth_settings({"MLOPS_API_KEY": "  \n "})["MLOPS_AUTH_MODE"] == "off"


def test_keys_split_on_commas_and_newlines_and_trimmed():
    result = auth_settings({"MLOPS_API_KEY": f" {FULL} \n{OTHER}\n",
                            "MLOPS_READ_API_KEY": READ, "MLOPS_METRICS_TOKEN": f" {KEY} "})
    assert result == {"MLOPS_API_KEY": (FULL, OTHER), "MLOPS_READ_API_KEY": (READ,),
                      "MLOPS_KEYS_FILE": (), "MLOPS_AUTH_MODE": "enforce",
                      "MLOPS_METRICS_TOKEN": KEY}
    assert auth_settings({"MLOPS_API_KEY": f"{FULL}, {OTHER}"})["MLOPS_API_KEY"] == (FULL, OTHER)


@pytest.mark.parametrize(("mode", "expected"), [("enforce", "enforce"), ("WARN", "warn"),
                                                ("Enforce", "enforce")])
def test_the_mode_is_read_in_any_case(mode, expected):
    assert auth_settings({"MLOPS_API_KEY": FULL, "MLOPS_AUTH_MODE": mode})[
        "MLOPS_AUTH_MODE"] == expected


def test_secrets_from_files_are_trimmed_and_lose_a_bom(tmp_path):
    (tmp_path / "full").write_bytes(b"\xef\xbb\xbf" + f"{FULL}\n{OTHER}\n".encode())
    (tmp_path / "read").write_text(f"\n  {READ}  \n")
    (tmp_path / "token").write_bytes(b"\xef\xbb\xbf" + KEY.encode() + b"\r\n")
    result = auth_settings({"MLOPS_API_KEY_FILE": str(tmp_path / "full"),
                            "MLOPS_READ_API_KEY_FILE": str(tmp_path / "read"),
                            "MLOPS_METRICS_TOKEN_FILE": str(tmp_path / "token")})
    assert (result["MLOPS_API_KEY"], result["MLOPS_READ_API_KEY"],
            result["MLOPS_METRICS_TOKEN"]) == ((FULL, OTHER), (READ,), KEY)


def test_values_already_read_pass_through():
    spec = KeySpec(KEY, Grant(frozenset({"write"})))
    result = auth_settings({"MLOPS_API_KEY": (FULL,), "MLOPS_KEYS_FILE": (spec,)})
    assert (result["MLOPS_API_KEY"], result["MLOPS_KEYS_FILE"]) == ((FULL,), (spec,))


def test_a_keys_file_alone_with_a_writer_allows_read_keys(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(entry('scopes = ["write"]\nbusinesses = ["a"]'))
    result = auth_settings({"MLOPS_READ_API_KEY": READ, "MLOPS_KEYS_FILE": str(path)})
    assert result["MLOPS_AUTH_MODE"] == "enforce"
    assert [s.key for s in result["MLOPS_KEYS_FILE"]] == [KEY]
    assert result["MLOPS_READ_API_KEY"] == (READ,)


def file_of(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(("values", "message"), [
    ({"MLOPS_READ_API_KEY": READ},
     "MLOPS_READ_API_KEY needs MLOPS_API_KEY too (no key could write)"),
    ({"MLOPS_READ_API_KEY": READ, "MLOPS_KEYS_FILE": ("keys", 'scopes = ["read", "erase"]')},
     "MLOPS_READ_API_KEY needs MLOPS_API_KEY too (no key could write)"),
    ({"MLOPS_API_KEY": f"{FULL},{READ}", "MLOPS_READ_API_KEY": READ},
     "a key is in both MLOPS_API_KEY and MLOPS_READ_API_KEY"),
    ({"MLOPS_API_KEY": FULL, "MLOPS_KEYS_FILE": ("keys", 'scopes = ["read"]', FULL)},
     "a key of MLOPS_KEYS_FILE is also in MLOPS_API_KEY or MLOPS_READ_API_KEY (give each "
     "key once)"),
    ({"MLOPS_API_KEY": FULL, "MLOPS_READ_API_KEY": KEY,
      "MLOPS_KEYS_FILE": ("keys", 'scopes = ["read"]')},
     "a key of MLOPS_KEYS_FILE is also in MLOPS_API_KEY or MLOPS_READ_API_KEY (give each "
     "key once)"),
    ({"MLOPS_API_KEY": FULL, "MLOPS_AUTH_MODE": "off"},
     "MLOPS_AUTH_MODE must be enforce or warn, got 'off'"),
    ({"MLOPS_API_KEY": FULL, "MLOPS_AUTH_MODE": "Loose"},
     "MLOPS_AUTH_MODE must be enforce or warn, got 'loose'"),
    ({"MLOPS_AUTH_MODE": "enforce"},
     "MLOPS_AUTH_MODE needs MLOPS_API_KEY (without a key nothing is checked)"),
    ({"MLOPS_API_KEY": f"{FULL},"}, "MLOPS_API_KEY holds an empty key (check the commas)"),
    ({"MLOPS_READ_API_KEY": f"{READ}, ,{OTHER}", "MLOPS_API_KEY": FULL},
     "MLOPS_READ_API_KEY holds an empty key (check the commas)"),
    ({"MLOPS_API_KEY": f"{FULL},{'k' * 15}"},
     "MLOPS_API_KEY must be at least 16 characters (key 2 of 2 has 15)" + HINT),
    ({"MLOPS_API_KEY": FULL, "MLOPS_METRICS_TOKEN": "t" * 15},
     "MLOPS_METRICS_TOKEN must be at least 16 characters (it has 15)" + HINT),
    ({"MLOPS_METRICS_TOKEN": FULL, "MLOPS_METRICS_TOKEN_FILE": ("token", KEY)},
     "set MLOPS_METRICS_TOKEN or MLOPS_METRICS_TOKEN_FILE, not both"),
    ({"MLOPS_API_KEY_FILE": ("empty", " \n")}, "MLOPS_API_KEY_FILE names an empty file"),
    ({"MLOPS_API_KEY_FILE": ("latin1", b"caf\xe9-0123456789abcdef")},
     "MLOPS_API_KEY_FILE is not UTF-8 text"),
    ({"MLOPS_API_KEY_FILE": "/nonexistent/full"},
     "MLOPS_API_KEY_FILE cannot be read: No such file or directory"),
    ({"MLOPS_API_KEY_FILE": ("short", "short-key\n")},
     "MLOPS_API_KEY must be at least 16 characters (it has 9)" + HINT),
    ({"MLOPS_KEYS_FILE": ("keys", 'scopes = ["raed"]')},
     "MLOPS_KEYS_FILE key 1: scopes.0: Input should be 'write', 'read' or 'erase'"),
    ({"MLOPS_KEYS_FILE": "/nonexistent/keys.toml"},
     "MLOPS_KEYS_FILE cannot be read: No such file or directory"),
])
def test_auth_settings_refuse_in_one_line_naming_the_variable(tmp_path, values, message):
    """A tuple stands for a file written first: (name, contents) or, for a keys file,
    (name, the entry's body, its key)."""
    given = {}
    for name, value in values.items():
        if isinstance(value, tuple) and name == "MLOPS_KEYS_FILE":
            body, key = value[1], (value[2] if len(value) > 2 else KEY)
            given[name] = file_of(tmp_path, value[0], entry(body, key=key).encode())
        elif isinstance(value, tuple):
            content = value[1] if isinstance(value[1], bytes) else value[1].encode()
            given[name] = file_of(tmp_path, value[0], content)
        else:
            given[name] = value
    with pytest.raises(ValueError) as refused:
        auth_settings(given)
    text = str(refused.value)
    assert text == message
    assert "\n" not in text and not any(secret in text for secret in SECRETS)
