#!/usr/bin/env python3
"""Parses every YAML and JSON file under deploy/ and grafana/ and checks the Grafana
dashboard's structure, so that a typo in the operations kit fails CI.

Usage: scripts/check-kits.py [REPO_ROOT]   (default: the parent of this script's directory)
Exit status: 0 when everything passes, 1 on problems (each printed), 2 on a usage error.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

try:
    import yaml
except ImportError:  # CI images without PyYAML: install it for this user and retry.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--user", "pyyaml"], check=False
    )
    import site
    import importlib

    importlib.invalidate_caches()
    sys.path.append(site.getusersitepackages())
    import yaml

ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
KIT_DIRS = ("deploy", "grafana")
DATASOURCE_REFS = {"${datasource}", "$datasource"}
MIN_SCHEMA_VERSION = 39

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def load_all():
    """Parses every kit file; returns {path: [documents]}."""
    parsed = {}
    for kit in KIT_DIRS:
        base = ROOT / kit
        if not base.is_dir():
            problem(kit, "directory missing")
            continue
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(ROOT)
            if path.suffix in (".yaml", ".yml"):
                try:
                    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
                except yaml.YAMLError as e:
                    problem(rel, f"invalid YAML: {e}")
                    continue
                if not docs:
                    problem(rel, "no YAML document")
                parsed[rel] = docs
            elif path.suffix == ".json":
                try:
                    parsed[rel] = [json.loads(path.read_text())]
                except json.JSONDecodeError as e:
                    problem(rel, f"invalid JSON: {e}")
    return parsed


def check_datasource(where, ds):
    if isinstance(ds, str):
        if ds not in DATASOURCE_REFS:
            problem(where, f"datasource {ds!r} is hard-coded; use ${{datasource}}")
        return
    if not isinstance(ds, dict):
        problem(where, "has no datasource")
        return
    if ds.get("type") != "prometheus":
        problem(where, f"datasource type {ds.get('type')!r}, expected 'prometheus'")
    if ds.get("uid") not in DATASOURCE_REFS:
        problem(where, f"datasource uid {ds.get('uid')!r} is hard-coded; use ${{datasource}}")


def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))  # collapsed rows nest their panels


def check_dashboard(rel, dash):
    if not isinstance(dash, dict) or "panels" not in dash:
        return False  # not a dashboard (for example a provisioning file)
    schema = dash.get("schemaVersion")
    if not isinstance(schema, int) or schema < MIN_SCHEMA_VERSION:
        problem(rel, f"schemaVersion {schema!r}, expected >= {MIN_SCHEMA_VERSION}")
    for key in ("title", "uid"):
        if not dash.get(key):
            problem(rel, f"missing {key}")

    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds_var = variables.get("datasource")
    if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        problem(rel, "templating needs a 'datasource' variable of type datasource, query prometheus")
    inst = variables.get("instance")
    if not inst or inst.get("type") != "query":
        problem(rel, "templating needs an 'instance' query variable")
    else:
        q = inst.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if "label_values(phantom_authz_build_info" not in (q or "") or "instance" not in (q or ""):
            problem(rel, f"instance variable query {q!r} is not label_values(phantom_authz_build_info, instance)")
    for name, var in variables.items():
        if var.get("type") == "query":
            check_datasource(f"{rel} variable {name}", var.get("datasource"))

    ids = set()
    for p in all_panels(dash["panels"]):
        where = f"{rel} panel {p.get('id')} {p.get('title')!r}"
        if p.get("type") == "row":
            continue
        if not p.get("title"):
            problem(where, "has no title")
        if p.get("id") in ids:
            problem(where, "duplicate panel id")
        ids.add(p.get("id"))
        if not isinstance(p.get("gridPos"), dict):
            problem(where, "has no gridPos")
        check_datasource(where, p.get("datasource"))
        targets = p.get("targets") or []
        if not targets:
            problem(where, "has no targets")
        for t in targets:
            twhere = f"{where} target {t.get('refId')}"
            expr = t.get("expr", "")
            if not expr.strip():
                problem(twhere, "has no expr")
                continue
            if "datasource" in t:
                check_datasource(twhere, t["datasource"])
            if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}") \
                    or expr.count("[") != expr.count("]"):
                problem(twhere, f"unbalanced brackets in {expr!r}")
            for window in re.findall(r"\[([^\]]+)\]", expr):
                if "rate(" in expr and window != "$__rate_interval":
                    problem(twhere, f"rate window [{window}] should be [$__rate_interval]")
            if "phantom_authz_" in expr and "$instance" not in expr and "${instance}" not in expr:
                problem(twhere, f"does not filter on $instance: {expr!r}")
    return True


def walk(node):
    """Every dict inside a parsed document."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def check_envoy(rel, doc):
    """The ext_authz settings phantom-authz relies on, and cluster references that resolve."""
    clusters = {c.get("name"): c for c in doc.get("static_resources", {}).get("clusters", [])}
    filters = [d for d in walk(doc) if d.get("name") == "envoy.filters.http.ext_authz"
               and "typed_config" in d]
    if not filters:
        problem(rel, "no envoy.filters.http.ext_authz filter")
    for f in filters:
        cfg = f["typed_config"]
        if "http_service" in cfg:
            check_envoy_http_service(rel, cfg, clusters)
            continue
        want = {"transport_api_version": "V3", "failure_mode_allow": False,
                "encode_raw_headers": True, "include_peer_certificate": False}
        for key, value in want.items():
            if cfg.get(key) != value:
                problem(rel, f"ext_authz {key} is {cfg.get(key)!r}, expected {value!r}")
        if cfg.get("status_on_error", {}).get("code") != 503:
            problem(rel, "ext_authz status_on_error.code should be 503")
        grpc = cfg.get("grpc_service", {})
        if grpc.get("timeout") != "0.2s":
            problem(rel, f"ext_authz grpc_service.timeout is {grpc.get('timeout')!r}, expected '0.2s'")
        name = grpc.get("envoy_grpc", {}).get("cluster_name")
        cluster = clusters.get(name)
        if cluster is None:
            problem(rel, f"ext_authz cluster {name!r} is not defined")
        elif "http2_protocol_options" not in json.dumps(cluster):
            problem(rel, f"cluster {name!r} needs http2 protocol options (gRPC)")
    for d in walk(doc):
        route = d.get("route")
        if isinstance(route, dict) and "cluster" in route and route["cluster"] not in clusters:
            problem(rel, f"route to undefined cluster {route['cluster']!r}")


def check_envoy_http_service(rel, cfg, clusters):
    """ext_authz over HTTP: fail closed, the same deadline, the JWT and claim header let through."""
    if cfg.get("failure_mode_allow") is not False:
        problem(rel, "ext_authz http_service: failure_mode_allow must be false")
    if cfg.get("status_on_error", {}).get("code") != 503:
        problem(rel, "ext_authz http_service: status_on_error.code should be 503")
    server = cfg["http_service"].get("server_uri", {})
    if server.get("timeout") != "0.2s":
        problem(rel, f"ext_authz http_service timeout is {server.get('timeout')!r}, expected '0.2s'")
    if server.get("cluster") not in clusters:
        problem(rel, f"ext_authz http_service cluster {server.get('cluster')!r} is not defined")
    upstream = cfg["http_service"].get("authorization_response", {}).get("allowed_upstream_headers", {})
    allowed = {p.get("exact") for p in upstream.get("patterns", [])}
    if "authorization" not in allowed:
        problem(rel, "ext_authz http_service must let the Authorization header through upstream")


def check_haproxy(rel, text):
    """What the HAProxy config must say: the Lua action, the JWT set, the claim header dropped."""
    for needle in ("lua-load", "lua.auth-request", "set-header Authorization", "del-header X-User-Id",
                   "set-header X-Forwarded-Uri"):
        if needle not in text:
            problem(rel, f"haproxy config does not contain {needle!r}")


def check_traefik(rel, doc):
    middlewares = doc.get("http", {}).get("middlewares", {})
    auth = [m["forwardAuth"] for m in middlewares.values() if "forwardAuth" in m]
    if not auth:
        problem(rel, "no forwardAuth middleware")
    for m in auth:
        if "Authorization" not in m.get("authResponseHeaders", []):
            problem(rel, "forwardAuth must copy Authorization from phantom-authz's answer")


def check_envoy_schema(rel, doc):
    """The whole file against Envoy's own v3 API (xds-protos): every field and type URL must
    exist, as `envoy --mode validate` would insist; Envoy itself cannot run here."""
    import importlib
    from google.protobuf import json_format
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    # typed_config payloads resolve only once their modules are loaded.
    for module in (
        "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
        "envoy.extensions.filters.http.ext_authz.v3.ext_authz_pb2",
        "envoy.extensions.filters.http.router.v3.router_pb2",
        "envoy.extensions.access_loggers.stream.v3.stream_pb2",
        "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
    ):
        importlib.import_module(module)
    try:
        json_format.ParseDict(doc, bootstrap_pb2.Bootstrap())
    except json_format.ParseError as error:
        problem(rel, f"not a valid Envoy v3 Bootstrap: {error}")


def check_placeholder_secret(rel, doc):
    """A placeholder cache secret must be too short to start with: one that passes the 32-byte
    floor would run a deployment whose Redis writers can forge allows."""
    secret = doc.get("stringData", {}).get("cache-secret")
    if secret is not None and len(secret.strip()) >= 32:
        problem(rel, "the placeholder cache-secret is long enough to be accepted; keep it under 32 bytes")


def check_deployment(rel, doc):
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    containers = spec.get("containers") or []
    if not containers:
        problem(rel, "Deployment has no containers")
    for c in containers:
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
        if ports.get("grpc") != 9001 or ports.get("admin") != 9090:
            problem(rel, f"container ports {ports}, expected grpc 9001 and admin 9090")
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            got = c.get(probe, {}).get("httpGet", {})
            if got.get("path") != path or got.get("port") not in ("admin", 9090):
                problem(rel, f"{probe} should GET {path} on the admin port, not {got}")
        env = {e.get("name") for e in c.get("env", [])}
        for name in env:
            if not re.fullmatch(r"PHANTOM_AUTHZ_[A-Z0-9_]+", name):
                problem(rel, f"env {name!r} is not a PHANTOM_AUTHZ_ variable")
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False:
            problem(rel, "container needs readOnlyRootFilesystem and no privilege escalation")


def main():
    parsed = load_all()
    dashboards = 0
    for rel, docs in parsed.items():
        if rel.suffix == ".json":
            dashboards += check_dashboard(rel, docs[0])
        if rel.parts[:2] == ("deploy", "envoy"):
            for doc in docs:
                if isinstance(doc, dict):
                    check_envoy(rel, doc)
                    check_envoy_schema(rel, doc)
        if rel.parts[:2] == ("deploy", "traefik"):
            for doc in docs:
                check_traefik(rel, doc)
        for doc in docs:
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                check_placeholder_secret(rel, doc)
            if isinstance(doc, dict) and doc.get("kind") == "Deployment":
                check_deployment(rel, doc)
            # Kubernetes manifests: every object says what it is.
            if rel.parts[:2] == ("deploy", "kubernetes") or rel.parts[:2] == ("deploy", "istio"):
                if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
                    problem(rel, "a document has no apiVersion/kind")
                elif not doc.get("metadata", {}).get("name") and doc.get("kind") != "Kustomization":
                    problem(rel, f"{doc['kind']} has no metadata.name")
    if dashboards == 0:
        problem("grafana", "no dashboard found")
    haproxy = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
    if haproxy.exists():
        check_haproxy(haproxy.relative_to(ROOT), haproxy.read_text())
    else:
        problem("deploy/haproxy", "haproxy.cfg is missing")
    rules = ROOT / "grafana" / "alerts.yml"
    if rules.exists():
        for doc in parsed.get(rules.relative_to(ROOT), []):
            for group in doc.get("groups", []):
                for rule in group.get("rules", []):
                    name = rule.get("alert") or rule.get("record")
                    if "alert" in rule:
                        if "for" not in rule:
                            problem(rules.name, f"{name}: no 'for'")
                        if "severity" not in rule.get("labels", {}):
                            problem(rules.name, f"{name}: no severity label")
                        ann = rule.get("annotations", {})
                        if not ann.get("summary") or not ann.get("description"):
                            problem(rules.name, f"{name}: needs summary and description")

    print(f"check-kits: {len(parsed)} files parsed, {dashboards} dashboard(s) checked")
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        print(f"check-kits: FAIL ({len(problems)} problems)")
        sys.exit(1)
    print("check-kits: PASS")


if __name__ == "__main__":
    main()
