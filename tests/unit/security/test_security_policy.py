"""Policy evaluation order (hypothesis properties) and the policy file loader's errors.

The properties generate arbitrary valid policies, principals and resources and check the
documented order: system_admin, then tenant isolation, then ownership, then grants, else deny.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kflow.security.policy import (
    ACTIONS,
    RESOURCE_TYPES,
    VERBS,
    Grant,
    Permission,
    Policy,
    PolicyError,
    Resource,
    evaluate,
    load_policy,
    parse_grant,
    parse_policy,
    permission_for,
)
from kflow.security.principal import SYSTEM_ADMIN, Principal

NAMES = ("alice", "bob", "carol")
TENANTS = ("acme", "globex")
ROLE_NAMES = ("operator", "viewer", "developer")
IDS = ("order-1", "order-2", "order-3")

names = st.sampled_from(NAMES)
tenants = st.sampled_from(TENANTS)
ids = st.sampled_from(IDS)
actions = st.sampled_from(sorted(ACTIONS))
type_level = st.builds(lambda t, v: f"{t}:{v}", st.sampled_from((*RESOURCE_TYPES, "*")), st.sampled_from((*VERBS, "*")))
specific = st.builds(lambda g, i: f"{g}:{i}", type_level.filter(lambda g: not g.startswith("*")), ids) | \
    st.builds(lambda a, i: f"{ACTIONS[a].resource_type}:{a}:{i}", actions, ids)


@st.composite
def policies(draw: st.DrawFn, admins: bool = False) -> Policy:
    """Any valid policy over the small vocabulary above (``system_admin`` bound only when ``admins``)."""
    roles = draw(st.dictionaries(st.sampled_from(ROLE_NAMES), st.lists(type_level, max_size=4), max_size=3))
    bindable = sorted(roles) + ([SYSTEM_ADMIN] if admins else [])
    bindings = draw(st.dictionaries(tenants, st.dictionaries(names, st.lists(st.sampled_from(bindable), max_size=2),
                                                              max_size=3), max_size=2)) if bindable else {}
    grants = draw(st.dictionaries(tenants, st.dictionaries(names, st.lists(type_level | specific, max_size=4),
                                                            max_size=3), max_size=2))
    return parse_policy({"roles": roles, "bindings": bindings, "grants": grants})


@st.composite
def requests(draw: st.DrawFn, same_tenant: bool | None = None) -> tuple[Principal, str, Resource]:
    """A principal (without token roles), an action and a resource of the type the action acts on.

    ``same_tenant``: the resource is in the principal's tenant (True), in another (False), or either (None).
    """
    who = Principal(draw(names), draw(tenants))
    action = draw(actions)
    if same_tenant is None:
        tenant = draw(tenants)
    else:
        tenant = who.tenant if same_tenant else next(t for t in TENANTS if t != who.tenant)
    owner = draw(st.none() | names)
    return who, action, Resource(ACTIONS[action].resource_type, draw(ids), tenant, owner)


def everything_for(who: Principal) -> dict[str, Any]:
    """A policy document giving ``who`` every permission in every tenant, by every kind of grant."""
    return {"roles": {"all": ["*:*"]},
            "bindings": {t: {who.name: ["all"]} for t in TENANTS},
            "grants": {t: {who.name: ["*:*", *(f"{r}:*:{i}" for r in RESOURCE_TYPES for i in IDS)]} for t in TENANTS}}


# --------------------------------------------------------------------------- properties of the order


@given(requests(same_tenant=True))
def test_deny_by_default(request: tuple[Principal, str, Resource]) -> None:
    who, action, resource = request
    assume(resource.owner != who.name)
    verdict = evaluate(parse_policy({}), who, action, resource)
    assert not verdict.allowed and "has none" in verdict.reason


@given(policies(), requests(same_tenant=True))
def test_a_principal_the_policy_does_not_name_is_denied(policy: Policy, request: tuple[Principal, str, Resource]) -> None:
    _, action, resource = request
    stranger = Principal("mallory", resource.tenant)
    assert not evaluate(policy, stranger, action, resource).allowed


@given(policies(admins=True), requests(), st.booleans())
def test_system_admin_is_always_allowed(policy: Policy, request: tuple[Principal, str, Resource],
                                        by_token: bool) -> None:
    who, action, resource = request
    if by_token:
        who = Principal(who.name, who.tenant, frozenset({SYSTEM_ADMIN}))
    else:
        doc = policy.model_dump()
        doc["bindings"].setdefault(who.tenant, {})[who.name] = [SYSTEM_ADMIN]
        policy = parse_policy(doc)
    verdict = evaluate(policy, who, action, resource)
    assert verdict.allowed and SYSTEM_ADMIN in verdict.reason


@given(requests(same_tenant=False), policies())
def test_tenant_isolation_beats_roles_grants_and_ownership(request: tuple[Principal, str, Resource],
                                                           extra: Policy) -> None:
    who, action, resource = request
    doc = everything_for(who)
    doc["roles"].update(extra.model_dump()["roles"])
    resource = Resource(resource.type, resource.id, resource.tenant, owner=who.name)
    verdict = evaluate(parse_policy(doc), Principal(who.name, who.tenant, frozenset({"all"})), action, resource)
    assert not verdict.allowed and "tenant isolation" in verdict.reason


@given(requests(same_tenant=False))
def test_tenant_isolation_does_not_stop_system_admin(request: tuple[Principal, str, Resource]) -> None:
    who, action, resource = request
    admin = Principal(who.name, who.tenant, frozenset({SYSTEM_ADMIN}))
    assert evaluate(parse_policy({}), admin, action, resource).allowed


@given(policies(), requests(same_tenant=True))
def test_the_owner_holds_every_permission_on_its_resource(policy: Policy, request: tuple[Principal, str, Resource]) -> None:
    who, action, resource = request
    owned = Resource(resource.type, resource.id, resource.tenant, owner=who.name)
    verdict = evaluate(policy, who, action, owned)
    assert verdict.allowed
    assert "owns" in verdict.reason or SYSTEM_ADMIN in verdict.reason


@given(requests(same_tenant=True), ids, ids)
def test_a_resource_specific_grant_applies_only_to_its_id(request: tuple[Principal, str, Resource], granted: str,
                                                          other: str) -> None:
    who, action, _ = request
    assume(granted != other)
    perm = ACTIONS[action]
    policy = parse_policy({"grants": {who.tenant: {who.name: [f"{perm}:{granted}"]}}})
    on = Resource(perm.resource_type, granted, who.tenant)
    off = Resource(perm.resource_type, other, who.tenant)
    assert evaluate(policy, who, action, on).allowed
    assert evaluate(policy, who, action, on).reason == f"grant {perm}:{granted} on {perm.resource_type} '{granted}'"
    assert not evaluate(policy, who, action, off).allowed


@given(requests(same_tenant=True), ids)
def test_a_resource_specific_grant_gives_only_its_permission(request: tuple[Principal, str, Resource], rid: str) -> None:
    who, action, _ = request
    perm = ACTIONS[action]
    policy = parse_policy({"grants": {who.tenant: {who.name: [f"{perm}:{rid}"]}}})
    for other_action, other in ACTIONS.items():
        if other.resource_type == perm.resource_type:
            verdict = evaluate(policy, who, other_action, Resource(other.resource_type, rid, who.tenant))
            assert verdict.allowed == (other == perm), (other_action, verdict)


def merged(base: Policy, more: Policy) -> Policy:
    """``base`` with every role permission, binding and grant of ``more`` added."""
    b, m = base.model_dump(), more.model_dump()
    out: dict[str, Any] = {"roles": {r: (*b["roles"].get(r, ()), *m["roles"].get(r, ()))
                                     for r in {*b["roles"], *m["roles"]}}}
    for section in ("bindings", "grants"):
        out[section] = {t: {n: (*b[section].get(t, {}).get(n, ()), *m[section].get(t, {}).get(n, ()))
                            for n in {*b[section].get(t, {}), *m[section].get(t, {})}}
                        for t in {*b[section], *m[section]}}
    return parse_policy(out)


@settings(max_examples=200)
@given(policies(admins=True), policies(admins=True), requests())
def test_more_grants_never_take_a_permission_away(base: Policy, more: Policy,
                                                  request: tuple[Principal, str, Resource]) -> None:
    who, action, resource = request
    if evaluate(base, who, action, resource).allowed:
        assert evaluate(merged(base, more), who, action, resource).allowed


# --------------------------------------------------------------------------- the order, by example


def test_each_rule_is_named_in_the_documented_order() -> None:
    """With every rule able to allow, the earliest one answers; taking rules away, from the top, shows the next."""
    who = Principal("alice", "acme")
    doc: dict[str, Any] = {"roles": {"ops": ["instance:Manage"]},
                           "bindings": {"acme": {"alice": ["ops", SYSTEM_ADMIN]}},
                           "grants": {"acme": {"alice": ["instance:Manage", "instance:cancel:order-1"]}}}
    owned = Resource("instance", "order-1", "acme", owner="alice")
    assert evaluate(parse_policy(doc), who, "cancel", owned).reason == "role 'system_admin' allows everything"
    doc["bindings"]["acme"]["alice"] = ["ops"]
    assert evaluate(parse_policy(doc), who, "cancel", owned).reason == "'alice' owns instance 'order-1'"
    not_owned = Resource("instance", "order-1", "acme", owner="bob")
    assert evaluate(parse_policy(doc), who, "cancel", not_owned).reason == "role 'ops' grants instance:Manage"
    doc["bindings"] = {}
    assert evaluate(parse_policy(doc), who, "cancel", not_owned).reason == "direct grant instance:Manage"
    doc["grants"]["acme"]["alice"] = ["instance:cancel:order-1"]
    assert evaluate(parse_policy(doc), who, "cancel", not_owned).reason == \
        "grant instance:Manage:order-1 on instance 'order-1'"
    doc["grants"] = {}
    assert not evaluate(parse_policy(doc), who, "cancel", not_owned).allowed


def test_token_roles_and_bound_roles_both_count() -> None:
    policy = parse_policy({"roles": {"viewer": ["instance:View"], "ops": ["instance:Manage"]},
                           "bindings": {"acme": {"alice": ["ops"]}}})
    who = Principal("alice", "acme", frozenset({"viewer"}))
    target = Resource("instance", "order-1", "acme")
    assert evaluate(policy, who, "status", target).allowed
    assert evaluate(policy, who, "cancel", target).allowed
    assert not evaluate(policy, who, "signal", target).allowed
    # bindings are per tenant: the same name in another tenant has no bound roles
    assert not evaluate(policy, Principal("alice", "globex"), "cancel", Resource("instance", "o", "globex")).allowed


def test_grants_in_one_tenant_do_not_apply_in_another() -> None:
    policy = parse_policy({"grants": {"acme": {"bob": ["instance:Execute"]}}})
    assert evaluate(policy, Principal("bob", "acme"), "signal", Resource("instance", "x", "acme")).allowed
    assert not evaluate(policy, Principal("bob", "globex"), "signal", Resource("instance", "x", "globex")).allowed


def test_each_operation_maps_to_its_permission() -> None:
    expected = {
        "deploy": "definition:Create", "deploy_version": "definition:Edit", "start": "definition:Execute",
        "signal": "instance:Execute", "update": "instance:Execute", "query": "instance:Execute",
        "status": "instance:View", "list": "instance:View", "history": "instance:View",
        "cancel": "instance:Manage", "terminate": "instance:Manage", "suspend": "instance:Manage",
        "resume": "instance:Manage", "retry": "instance:Manage",
        "dlq_replay": "system:Admin", "policy_apply": "system:Admin", "limits_apply": "system:Admin",
    }
    assert {a: str(p) for a, p in ACTIONS.items()} == expected


def test_actions_may_be_written_as_permissions() -> None:
    assert permission_for("instance:manage", "instance") == Permission("instance", "Manage")
    assert permission_for("cancel", "instance") == Permission("instance", "Manage")
    with pytest.raises(ValueError, match="unknown action 'fly'"):
        permission_for("fly", "instance")
    with pytest.raises(ValueError, match="acts on definition resources"):
        permission_for("start", "instance")
    with pytest.raises(ValueError, match="unknown action"):
        permission_for("instance:*", "instance")


def test_grant_grammar() -> None:
    assert parse_grant("instance:execute") == Grant("instance", "Execute")
    assert parse_grant("definition:*") == Grant("definition", "*")
    assert parse_grant("instance:cancel:order-42") == Grant("instance", "Manage", "order-42")
    assert parse_grant("instance:Manage:ns:order:42") == Grant("instance", "Manage", "ns:order:42")
    assert str(parse_grant("instance:cancel:order-42")) == "instance:Manage:order-42"


def test_resource_types_are_checked() -> None:
    with pytest.raises(ValueError, match="resource type"):
        Resource("tenant", "x")


# --------------------------------------------------------------------------- the loader


def problems_of(doc: Any) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(doc, "p.yaml")
    assert str(info.value).startswith("invalid policy p.yaml (")
    return info.value.problems


def test_loader_lists_every_problem_at_once() -> None:
    problems = problems_of({
        "roles": {"ops": ["instance:View", "instance:Fly", "robot:View", "instance:Manage:order-1"],
                  SYSTEM_ADMIN: ["*:*"]},
        "bindings": {"acme": {"alice": ["ops", "nope"], "bob": "ops"}},
        "grants": {"acme": {"bob": ["instance:cancel:order-42", 3, "definition:cancel:x", "instance:View:*"]}},
        "rules": [],
    })
    expected = [
        "roles.ops[1]: 'instance:Fly': unknown verb or operation 'Fly'",
        "roles.ops[2]: 'robot:View': unknown resource type 'robot'",
        "roles.ops[3]: 'instance:Manage:order-1': a role grants a permission over a resource type",
        "bindings.acme.bob: expected a list",
        "grants.acme.bob[1]: expected a permission string like 'instance:Execute', but got int",
        "grants.acme.bob[2]: 'definition:cancel:x': operation 'cancel' acts on instance resources",
        "grants.acme.bob[3]: 'instance:View:*': a resource id must be named",
        "rules: unknown field (expected roles, bindings, grants)",
        "roles.system_admin: role 'system_admin' is built in",
        "bindings.acme.alice[1]: unknown role 'nope'",
    ]
    assert len(problems) == len(expected), problems
    for want in expected:
        assert any(p.startswith(want) for p in problems), (want, problems)


@pytest.mark.parametrize("doc,problem", [
    ([1, 2], "expected a mapping with roles, bindings and grants, but got list"),
    ({"roles": ["ops"]}, "roles: expected a mapping"),
    ({"roles": {"ops": "instance:View"}}, "roles.ops: expected a list"),
    ({"bindings": {"acme": {"": ["x"]}}}, 'bindings.acme."": expected a non-empty name'),
    ({"grants": {"acme": {"bob": ["instance"]}}}, "grants.acme.bob[0]: expected TYPE:VERB or TYPE:VERB:ID"),
])
def test_loader_names_where_the_problem_is(doc: Any, problem: str) -> None:
    assert any(p.startswith(problem) for p in problems_of(doc)), problems_of(doc)


def test_load_policy_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("roles:\n  operator: [instance:View, instance:Manage]\n"
                    "bindings:\n  acme:\n    alice: [operator]\n"
                    "grants:\n  acme:\n    bob: [instance:Execute, instance:cancel:order-42]\n")
    policy = load_policy(path)
    assert policy.roles["operator"] == (Grant("instance", "View"), Grant("instance", "Manage"))
    assert policy.grants["acme"]["bob"][1] == Grant("instance", "Manage", "order-42")
    assert evaluate(policy, Principal("bob", "acme"), "cancel", Resource("instance", "order-42", "acme")).allowed


def test_an_empty_policy_file_denies_everything(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert not evaluate(load_policy(path), Principal("a", "t"), "status", Resource("instance", "i", "t")).allowed


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("roles:\n  ops: [instance:View\nbindings: {}\n")
    with pytest.raises(PolicyError, match=r"not valid YAML at line \d+ column \d+") as info:
        load_policy(path)
    assert str(path) in str(info.value)


def test_a_policy_round_trips_through_its_dump() -> None:
    doc = {"roles": {"ops": ["instance:View", "definition:*"]}, "bindings": {"acme": {"alice": ["ops"]}},
           "grants": {"acme": {"bob": ["instance:cancel:order-42"]}}}
    policy = parse_policy(doc)
    assert parse_policy(policy.model_dump()) == policy
    assert policy.model_dump()["grants"] == {"acme": {"bob": ("instance:Manage:order-42",)}}
