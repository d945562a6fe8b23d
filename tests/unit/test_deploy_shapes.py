"""deploy/: the deployment shapes of issue 30. Opt-in Kustomize Components (monitoring, hpa,
keda, gateway, inference-pool) so that every overlay applies on a cluster without their CRDs;
the local overlay (kind/minikube, no GPU); the Gateway API route that exposes /v1 and the
playground only; the InferencePool and KServe LLMInferenceService examples. Every combination
is rendered (test_deploy.py: kubectl agreement, Kubernetes schemas, hardening, NetworkPolicies
for each); here, each custom resource against the fields of its CRD that deploy/ uses, and the
wiring each shape depends on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fakes import make_app
from test_deploy import (
    COMBOS,
    COMPONENTS,
    CRD_GROUPS,
    DEPLOY,
    EXAMPLES,
    GPU,
    K8S_VERSIONS,
    OVERLAYS,
    TARGETS,
    adapter_rules,
    alignserve_pod_labels,
    app_metric_names,
    metric_names_in,
    named,
    objects,
    one,
    pod_templates,
    selects,
    settings_of,
    vllm_metric_names,
)

from runtime.model_prep import EMBEDDED_MODEL_NAME

DOCS = Path(__file__).resolve().parents[2] / "docs" / "deployment-shapes.md"

# ------------------------------------------------------------------------------ CRD fields
# The fields deploy/ uses of each custom resource, transcribed from the CRDs (not shipped
# offline); anything else is refused, as with the ServiceMonitor in test_deploy.py.


def strict(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": list(required)}


_LABELS = {"type": "object", "additionalProperties": {
    "type": "string", "maxLength": 63, "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}}
_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
# gateway.networking.k8s.io Duration (GEP-2257)
_GW_DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}


def _resource(api_version: str, kind: str, spec: dict) -> dict:
    return strict({"apiVersion": {"const": api_version}, "kind": {"const": kind},
                   "metadata": {"type": "object", "required": ["name"]}, "spec": spec},
                  ("apiVersion", "kind", "metadata", "spec"))


_BACKEND_REF = strict({"group": {"type": "string"}, "kind": {"type": "string"}, "name": _NAME,
                       "namespace": {"type": "string"}, "port": _PORT,
                       "weight": {"type": "integer", "minimum": 0}}, ("name",))
HTTP_ROUTE = _resource("gateway.networking.k8s.io/v1", "HTTPRoute", strict({
    "parentRefs": {"type": "array", "minItems": 1, "maxItems": 32, "items": strict({
        "group": {"type": "string"}, "kind": {"type": "string"}, "name": _NAME,
        "namespace": {"type": "string"}, "sectionName": {"type": "string"}, "port": _PORT},
        ("name",))},
    "hostnames": {"type": "array", "items": {"type": "string"}},
    "rules": {"type": "array", "minItems": 1, "maxItems": 16, "items": strict({
        "matches": {"type": "array", "maxItems": 64, "items": strict({"path": strict({
            "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
            "value": {"type": "string", "pattern": "^/", "maxLength": 1024}})})},
        "backendRefs": {"type": "array", "maxItems": 16, "items": _BACKEND_REF},
        "timeouts": strict({"request": _GW_DURATION, "backendRequest": _GW_DURATION}),
    })},
}, ("parentRefs", "rules")))

INFERENCE_POOL = _resource("inference.networking.k8s.io/v1", "InferencePool", strict({
    "selector": strict({"matchLabels": _LABELS}, ("matchLabels",)),
    "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8,
                    "items": strict({"number": _PORT}, ("number",))},
    "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
    "endpointPickerRef": strict({
        "group": {"type": "string"}, "kind": {"type": "string"}, "name": _NAME,
        "port": strict({"number": _PORT}, ("number",)),
        "failureMode": {"enum": ["FailOpen", "FailClose"]}}, ("name",)),
}, ("selector", "targetPorts")))

SCALED_OBJECT = _resource("keda.sh/v1alpha1", "ScaledObject", strict({
    "scaleTargetRef": strict({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                              "name": _NAME, "envSourceContainerName": {"type": "string"}},
                             ("name",)),
    "pollingInterval": {"type": "integer", "minimum": 1},
    "cooldownPeriod": {"type": "integer", "minimum": 0},
    "minReplicaCount": {"type": "integer", "minimum": 0},
    "maxReplicaCount": {"type": "integer", "minimum": 1},
    "advanced": strict({"horizontalPodAutoscalerConfig": strict({
        "name": {"type": "string"}, "behavior": {"type": "object"}}),
        "restoreToOriginalReplicaCount": {"type": "boolean"}}),
    "triggers": {"type": "array", "minItems": 1, "items": strict({
        "type": {"type": "string"}, "name": {"type": "string"},
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}}},
        ("type", "metadata"))},
}, ("scaleTargetRef", "triggers")))

LLM_INFERENCE_SERVICE = _resource("serving.kserve.io/v1alpha1", "LLMInferenceService", strict({
    "model": strict({"uri": {"type": "string", "pattern": r"^[a-z0-9+.-]+://"},
                     "name": {"type": "string"}}, ("uri",)),
    "replicas": {"type": "integer", "minimum": 0},
    "router": strict({"route": {"type": "object"}, "gateway": {"type": "object"},
                      "scheduler": {"type": "object"}}),
    "template": {"type": "object"},  # a PodSpec: against the Pod schema below
}, ("model",)))

SCHEMAS = {"HTTPRoute": HTTP_ROUTE, "InferencePool": INFERENCE_POOL,
           "ScaledObject": SCALED_OBJECT, "LLMInferenceService": LLM_INFERENCE_SERVICE}


def custom_resources(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["apiVersion"].split("/")[0] in CRD_GROUPS]


@pytest.mark.parametrize("target", [t for t in TARGETS if "+" in t or t in EXAMPLES])
def test_custom_resources_match_their_crds(target):
    docs = objects(target)
    for doc in custom_resources(docs):
        if doc["kind"] in SCHEMAS:
            jsonschema.validate(doc, SCHEMAS[doc["kind"]])
        else:
            assert doc["kind"] in {"ServiceMonitor", "LeaderWorkerSet"}, doc["kind"]
    for route in (d for d in docs if d["kind"] == "HTTPRoute"):
        for rule in route["spec"]["rules"]:
            for ref in rule["backendRefs"]:  # the CRD's rule: a Service reference needs a port
                if ref.get("kind", "Service") == "Service" and not ref.get("group"):
                    assert "port" in ref, ref
    for pool in (d for d in docs if d["kind"] == "InferencePool"):
        ref = pool["spec"]["endpointPickerRef"]  # the CRD's rule: a Service needs a port
        assert ref.get("kind", "Service") != "Service" or "port" in ref


def test_a_typo_in_a_custom_resource_fails_validation():
    route = one(objects("base+gateway"), "HTTPRoute")
    route["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Prefix"  # the Ingress spelling
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(route, HTTP_ROUTE)


# ------------------------------------------------------------------------------ components


def test_components_are_kustomize_components_and_all_are_tested():
    found = sorted(p.name for p in (DEPLOY / "components").iterdir() if p.is_dir())
    assert found == sorted(COMPONENTS)
    for name in found:
        spec = yaml.safe_load((DEPLOY / "components" / name / "kustomization.yaml").read_text())
        assert (spec["apiVersion"], spec["kind"]) == ("kustomize.config.k8s.io/v1alpha1",
                                                      "Component")
        assert any(name in t.split("+")[1:] for t in COMBOS), name
    overlays = sorted(f"overlays/{p.name}" for p in (DEPLOY / "overlays").iterdir())
    assert set(overlays) <= set(OVERLAYS)  # a new overlay is rendered and checked too


@pytest.mark.parametrize("target", OVERLAYS)
def test_overlays_apply_without_custom_resource_definitions(target):
    """`kubectl apply -k deploy/overlays/X` on a cluster without the Prometheus Operator, KEDA,
    Gateway API or inference-extension CRDs: nothing but built-in objects (multinode-lws is a
    LeaderWorkerSet by design, so it needs that one CRD)."""
    groups = {d["apiVersion"].split("/")[0] for d in custom_resources(objects(target))}
    assert groups == ({"leaderworkerset.x-k8s.io"} if target == "overlays/multinode-lws"
                      else set())
    spec = yaml.safe_load((DEPLOY / target / "kustomization.yaml").read_text())
    assert "components" not in spec  # opt-in: enabling one is the user's overlay's choice


@pytest.mark.parametrize("target", [t for t in COMBOS
                                    if {"hpa", "keda"} & set(t.split("+"))])
def test_autoscalers_scale_a_real_workload_on_scraped_series(target):
    docs = objects(target)
    scalers = [d for d in docs if d["kind"] in {"HorizontalPodAutoscaler", "ScaledObject"}]
    (scaler,) = scalers  # never two autoscalers on one Deployment
    ref = scaler["spec"]["scaleTargetRef"]
    workload = named(docs, ref["kind"], ref["name"])
    assert workload["apiVersion"] == ref["apiVersion"]
    # the series come from the pods the ServiceMonitor scrapes
    assert "ServiceMonitor" in {d["kind"] for d in docs}


def test_keda_scales_like_the_hpa():
    hpa = one(objects("base+monitoring+hpa"), "HorizontalPodAutoscaler")["spec"]
    keda = one(objects("base+monitoring+keda"), "ScaledObject")["spec"]
    assert (keda["minReplicaCount"], keda["maxReplicaCount"]) == (hpa["minReplicas"],
                                                                  hpa["maxReplicas"])
    behavior = keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == hpa["behavior"]
    for version in K8S_VERSIONS:  # KEDA hands it to the HPA it creates: the HPA's schema
        kubernetes_validate.validate(
            {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
             "metadata": {"name": "keda"}, "spec": {**hpa, "behavior": behavior}},
            version, strict=True)
    # the same series and per-pod targets as the HPA (through the adapter's names)
    adapter = {r["name"]["as"]: metric_names_in(r["seriesQuery"]).pop() for r in adapter_rules()}
    targets = {adapter[m["pods"]["metric"]["name"]]: m["pods"]["target"]["averageValue"]
               for m in hpa["metrics"]}
    triggers = {}
    for trigger in keda["triggers"]:
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        meta = trigger["metadata"]
        (series,) = metric_names_in(meta["query"])
        assert meta["query"].startswith("sum(")  # AverageValue divides the sum by the pods
        assert meta["serverAddress"].startswith("http://prometheus-operated.monitoring.svc")
        triggers[series] = meta["threshold"]
    assert triggers == targets
    ours = {s for s in triggers if s.startswith("alignserve:")}
    assert ours and ours <= app_metric_names()
    assert set(triggers) - ours <= vllm_metric_names()


# ------------------------------------------------------------------------------ gateway


def app_routes() -> set[str]:
    return {r.path for r in make_app().routes}


def exposed(route: dict) -> set[str]:
    """The app's routes a request through the HTTPRoute can reach (Gateway API PathPrefix:
    whole path segments; Exact: the path itself)."""
    out = set()
    for rule in route["spec"]["rules"]:
        for match in rule["matches"]:
            kind, value = match["path"]["type"], match["path"]["value"].rstrip("/")
            assert kind in {"PathPrefix", "Exact"}, "no regular expressions: easy to get wrong"
            for path in app_routes():
                if path == value or (kind == "PathPrefix" and path.startswith(value + "/")):
                    out.add(path)
    return out


GATEWAY_TARGETS = [t for t in COMBOS if "gateway" in t.split("+")]


@pytest.mark.parametrize("target", GATEWAY_TARGETS)
def test_the_gateway_exposes_the_api_and_playground_only(target):
    docs = objects(target)
    route = named(docs, "HTTPRoute", "alignserve")
    reachable = exposed(route)
    public = {p for p in app_routes() if p.startswith(("/v1/", "/playground"))}
    assert reachable == public
    assert not {p for p in reachable if p.startswith(("/admin", "/metrics", "/health", "/ready",
                                                      "/docs", "/openapi", "/tokenize"))}
    assert "/playground" in reachable and "/v1/chat/completions" in reachable
    for ref in route["spec"]["parentRefs"]:
        assert (ref["group"], ref["kind"]) == ("gateway.networking.k8s.io", "Gateway")
    timeout_s = settings_of(alignserve_container(docs)).request_timeout_s
    for rule in route["spec"]["rules"]:
        for ref in rule["backendRefs"]:
            backend = named(docs, ref["kind"], ref["name"])  # exists in the same render
            if ref["kind"] == "Service":
                assert ref["port"] in {p["port"] for p in backend["spec"]["ports"]}
                assert backend["spec"]["selector"].items() <= alignserve_pod_labels(docs).items()
        if "/v1" in {m["path"]["value"] for m in rule["matches"]}:
            # the server's own timeout answers first (an OpenAI-shaped error, not a cut stream)
            assert duration_s(rule["timeouts"]["request"]) > timeout_s


def duration_s(value: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|h|m|s)", value))


def alignserve_container(docs: list[dict]) -> dict:
    for name, spec in pod_templates(docs):
        if name in {"alignserve", "alignserve/leaderTemplate"}:
            return spec["containers"][0]
    raise AssertionError("no alignserve container")


# ------------------------------------------------------------------------------ inference pool

POOL_TARGETS = [t for t in COMBOS if "inference-pool" in t.split("+")]


@pytest.mark.parametrize("target", POOL_TARGETS)
def test_inference_pool_selects_the_alignserve_pods_and_its_picker_can_reach_them(target):
    docs = objects(target)
    pool = one(docs, "InferencePool")["spec"]
    labels = alignserve_pod_labels(docs)
    assert pool["selector"]["matchLabels"].items() <= labels.items()
    for _, spec in pod_templates(docs):  # the reward-model server is never in the pool
        for c in spec["containers"]:
            if c["name"] == "vllm":
                assert not pool["selector"]["matchLabels"].items() <= (
                    named(docs, "Deployment", "alignserve-rm")["spec"]["template"]["metadata"][
                        "labels"].items())
    c = alignserve_container(docs)
    (number,) = [p["number"] for p in pool["targetPorts"]]
    assert number == next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    assert number == settings_of(c).port
    route = named(docs, "HTTPRoute", "alignserve")
    (v1,) = [r for r in route["spec"]["rules"] if r["matches"][0]["path"]["value"] == "/v1"]
    assert v1["backendRefs"] == [{"group": "inference.networking.k8s.io",
                                  "kind": "InferencePool", "name": "alignserve"}]
    # the picker (pods labelled alignserve.io/endpoint-picker) scrapes the API port, and
    # answers the Gateway's proxy on its ext-proc port
    epp = {"alignserve.io/endpoint-picker": "true"}
    pols = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert selects(pols["alignserve-from-epp"], labels)
    (rule,) = pols["alignserve-from-epp"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": epp}}]
    assert selects(pols["alignserve-epp"], epp) and not selects(pols["alignserve-epp"], labels)
    (proxy,) = pols["alignserve-epp"]["ingress"]
    port = pool["endpointPickerRef"]["port"]["number"]
    assert proxy["ports"] == [{"port": port, "protocol": "TCP"}]
    scrape = [r for r in pols["alignserve-epp"]["egress"]
              if r["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name":
                                                              "alignserve"}}}]]
    assert scrape and scrape[0]["ports"] == [{"port": number, "protocol": "TCP"}]


def test_what_the_pickers_route_on_is_exported_by_the_installed_vllm():
    """The components' and the KServe example's notes name the vLLM series the endpoint
    picker reads: each one must exist in the vLLM alignserve runs (served on its /metrics)."""
    for path in (DEPLOY / "components" / "inference-pool" / "kustomization.yaml",
                 DEPLOY / "examples" / "kserve" / "llminferenceservice.yaml"):
        named_series = {m for m in metric_names_in(path.read_text()) if m.startswith("vllm:")}
        assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= named_series, path
        assert named_series <= vllm_metric_names(), (path, named_series - vllm_metric_names())


# ------------------------------------------------------------------------------ local


def test_local_overlay_runs_on_a_laptop_cluster_without_a_gpu():
    docs = objects("overlays/local")
    assert GPU not in yaml.safe_dump_all(docs) and "nvidia" not in yaml.safe_dump_all(docs)
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert not {"tolerations", "nodeSelector", "affinity"} & set(spec)
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # RWO: one pod at a time
    pvc = one(docs, "PersistentVolumeClaim")["spec"]
    assert pvc["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in pvc
    (c,) = spec["containers"]
    # the CPU image, as Dockerfile.cpu's build line tags it, loaded into the cluster
    dockerfile = (DEPLOY.parent / "Dockerfile.cpu").read_text()
    assert f"-t {c['image']} ." in dockerfile
    assert c["imagePullPolicy"] == "Never"
    s = settings_of(c)
    assert s.model == "embedded"  # shipped in the image: nothing to download
    res = c["resources"]
    gib = 2**30
    limit = quantity(res["limits"]["memory"])
    assert quantity(res["requests"]["memory"]) <= limit <= 8 * gib
    assert quantity(res["requests"]["cpu"]) <= 4
    (dshm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
    # the KV cache and the in-memory /dev/shm fit in the limit with room for the process
    assert s.kv_cache_gib * gib + quantity(dshm["emptyDir"]["sizeLimit"]) <= limit - 2 * gib


def quantity(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3}
    for unit, factor in units.items():
        if q.endswith(unit):
            return float(q[: -len(unit)]) * factor
    return float(q)


# ------------------------------------------------------------------------------ KServe


def test_kserve_llm_inference_service_runs_alignserve_in_kserves_shape():
    svc = one(objects("examples/kserve"), "LLMInferenceService")
    tpl = svc["spec"]["template"]
    (c,) = tpl["containers"]
    assert c["name"] == "main"  # KServe's template's container: merged, command replaced
    assert c["command"] == ["alignserve", "serve"]
    s = settings_of(c)
    assert str(s.model) == "/mnt/models"  # where KServe's storage initializer puts spec.model
    assert s.served_model_name == svc["spec"]["model"]["name"]  # the routing key clients send
    assert s.port == 8000 == c["ports"][0]["containerPort"]
    routes = {r.path for r in make_app().routes}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["scheme"] == "HTTP" and get["path"] in routes  # alignserve has no TLS
    assert set(svc["spec"]["router"]) == {"route", "gateway", "scheduler"}


# ------------------------------------------------------------------------------ docs


def test_the_documented_commands_name_real_paths():
    text = DOCS.read_text()
    paths = set(re.findall(r"\b(deploy/[\w./-]+|Dockerfile\.cpu)", text))
    assert paths
    for path in paths:
        assert (DEPLOY.parent / path.rstrip(".")).exists(), path
    for target in ("overlays/local", *(f"components/{c}" for c in COMPONENTS)):
        assert f"deploy/{target}" in text, target
    # the walk-through's request names the model the local overlay serves
    (body,) = re.findall(r"-d '(\{.*\})'", text)
    assert json.loads(body)["model"] == EMBEDDED_MODEL_NAME
    assert settings_of(one(objects("overlays/local"), "Deployment")["spec"]["template"]["spec"][
        "containers"][0]).model == "embedded"
