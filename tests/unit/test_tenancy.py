"""Tokens, tenants and tenant salts (router.tenancy), and the TLS/auth config keys."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, load_config
from router.tenancy import (TenantLimits, TokensFileError, TokenTable, load_token_table, tenant_salt,
                            tenant_scope)

ACME, GLOBEX = "acme-token-0123456789", "globex-token-0123456789"


def test_a_token_maps_to_its_tenant_and_nothing_else_does():
    table = TokenTable({"acme": [ACME, ACME + "-2"], "globex": [GLOBEX]})
    assert table.tenant_of(ACME) == "acme" and table.tenant_of(ACME + "-2") == "acme"
    assert table.tenant_of(GLOBEX) == "globex"
    for presented in (None, "", ACME[:-1], ACME + "x", ACME.upper(), " " + ACME):
        assert table.tenant_of(presented) is None
    assert table.tenants == {"acme", "globex"}


def test_the_tokens_file_is_checked_without_echoing_a_token(tmp_path):
    cases = {
        "acme: short\n": "must list at least one token",
        "acme: [short]\n": "token #0: must be a string of at least 16",
        "'bad name!': [acme-token-0123456789]\n": "tenant 'bad name!'",
        f"acme: [{ACME}]\nglobex: [{ACME}]\n": "listed twice",
        "[1, 2]\n": "must map each tenant",
        "{}\n": "no tokens",
        "acme: {max_in_flight: 2}\n": "must list at least one token",
        f"acme: {{tokens: [{ACME}], max_in_flight: 0}}\n": "max_in_flight must be an integer >= 1, got 0",
        f"acme: {{tokens: [{ACME}], max_in_flight: 2.5}}\n": "max_in_flight must be an integer",
        f"acme: {{tokens: [{ACME}], min_priority: 2147483648}}\n": "min_priority must be an int32",
        f"acme: {{tokens: [{ACME}], max_inflight: 2}}\n": "unknown key 'max_inflight'",
    }
    for text, message in cases.items():
        path = tmp_path / "tokens.yaml"
        path.write_text(text)
        with pytest.raises(TokensFileError, match=message.replace("(", r"\(")) as caught:
            load_token_table(path)
        assert ACME not in str(caught.value)
    with pytest.raises(TokensFileError, match="missing.yaml"):
        load_token_table(tmp_path / "missing.yaml")


def test_tenant_salts_never_collide_across_tenants_or_client_salts():
    salts = {tenant_salt(t, s) for t in ("a", "b", "a|b") for s in (None, "", "b", "|b", "a")}
    assert len(salts) == 15
    assert tenant_salt("a", "x") == tenant_salt("a", "x")
    assert tenant_salt("acme", None) != tenant_salt("globex", tenant_salt("acme", None))


def test_every_salt_of_a_tenant_lies_in_its_scope_and_a_flush_request_names_one_selection():
    from kvstore.redis_keys import SaltSelection, salt_scope
    from protos.kvtier.v1 import generation_pb2 as pb
    from router.requests import salts_of
    from workers.validation import InvalidRequestError

    for client_salt in (None, "x", "a/b"):
        assert salt_scope(tenant_salt("acme", client_salt)) == tenant_scope("acme") != tenant_scope("globex")
    assert salts_of(pb.FlushCacheRequest()) == SaltSelection()
    assert salts_of(pb.FlushCacheRequest(cache_salt="s")) == SaltSelection.one_salt("s")
    assert salts_of(pb.FlushCacheRequest(salt_scope="t")) == SaltSelection.in_scope("t")
    for request, field in ((pb.FlushCacheRequest(cache_salt="s", salt_scope="t"), "salt_scope"),
                           (pb.FlushCacheRequest(salt_scope="a/b"), "salt_scope"),
                           (pb.FlushCacheRequest(salt_scope=""), "salt_scope")):
        with pytest.raises(InvalidRequestError) as caught:
            salts_of(request)
        assert caught.value.field == field


def test_tls_keys_come_in_pairs_and_name_their_path():
    with pytest.raises(ConfigError, match=r"^router\.tls\.cert_file: and key_file must be set together"):
        load_config(overrides={"router": {"tls": {"cert_file": "cert.pem"}}})
    with pytest.raises(ConfigError, match=r"^router\.tls\.client_ca_file: needs cert_file"):
        load_config(overrides={"router": {"tls": {"client_ca_file": "ca.pem"}}})
    config = load_config(overrides={"router": {"tls": {"cert_file": "c", "key_file": "k"}, "auth": {"tokens_file": "t"}}})
    assert config.router.tls.enabled and config.router.auth.tokens_file == "t"


def test_serve_refuses_to_start_on_a_missing_or_bad_security_file(tmp_path):
    from cluster.serve import check_files

    with pytest.raises(ConfigError, match=r"^router\.tls\.cert_file: .*missing-cert.pem is not a readable file"):
        check_files(load_config(overrides={"router": {"tls": {"cert_file": str(tmp_path / "missing-cert.pem"),
                                                                "key_file": str(tmp_path / "key.pem")}}}))
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("acme: [short]\n")
    with pytest.raises(ConfigError, match=r"^router\.auth\.tokens_file: .*token #0"):
        check_files(load_config(overrides={"router": {"auth": {"tokens_file": str(tokens)}}}))


def test_a_tenant_may_be_given_limits_beside_its_tokens(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(f"acme: [{ACME}]\nglobex:\n  tokens: [{GLOBEX}]\n  max_in_flight: 4\n  min_priority: 0\n")
    table = load_token_table(path)
    assert table.tenant_of(GLOBEX) == "globex" and table.tenant_of(ACME) == "acme"
    assert table.limits_of("globex") == TenantLimits(max_in_flight=4, min_priority=0)
    assert table.limits_of("acme") == TenantLimits()
