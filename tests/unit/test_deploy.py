"""deploy/: every manifest (base, rendered overlays, each overlay with each set of opt-in
components that makes sense, monitoring, the examples) against the Kubernetes OpenAPI schemas
shipped in kubernetes-validate (offline, strict: unknown fields fail), custom resources against
the fields we use, and the wiring between them: env vars ↔ Settings, selectors ↔ labels, probes
↔ routes, HPA metrics ↔ Prometheus Adapter rules ↔ /metrics, dashboard ↔ /metrics; and the
hardening (issue 25): read-only roots, bounded scratch space, no `:latest`, default-deny
NetworkPolicies with only the listed allowances, the reward-model server's key and read-only
volume. The opt-in components and the shapes they add (issue 30): test_deploy_shapes.py.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fakes import make_app
from kubernetes_validate.utils import latest_version
from kustomize_lite import kubectl_render, render, strategic_merge

from server.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Opt-in Kustomize Components (deploy/components), in the order an overlay lists them
# (inference-pool patches the gateway's HTTPRoute, so it comes after it).
COMPONENTS = ["monitoring", "hpa", "keda", "gateway", "inference-pool"]
# The sets that make sense on a Deployment: an autoscaler needs the metrics the ServiceMonitor
# collects, HPA and KEDA exclude each other, the InferencePool is a backend of the gateway's route.
DEPLOYMENT_SETS = [("monitoring",), ("monitoring", "hpa"), ("monitoring", "keda"), ("gateway",),
                   ("gateway", "inference-pool"), ("monitoring", "hpa", "gateway", "inference-pool"),
                   ("monitoring", "keda", "gateway", "inference-pool")]
# A LeaderWorkerSet has no HPA or KEDA component (both scale the Deployment).
LWS_SETS = [("monitoring",), ("gateway",), ("monitoring", "gateway", "inference-pool")]
OVERLAYS = ["base", "overlays/gke", "overlays/eks", "overlays/tensor-parallel",
            "overlays/reward-model", "overlays/local", "overlays/multinode-lws"]
EXAMPLES = ["examples/kserve"]


def combo(target: str, components: tuple[str, ...]) -> str:
    """A target name for an overlay with components: 'overlays/gke+monitoring+hpa'."""
    return "+".join((target, *components))


COMBOS = [combo(o, s) for o in OVERLAYS for s in (
    LWS_SETS if o == "overlays/multinode-lws" else DEPLOYMENT_SETS)]
TARGETS = [*OVERLAYS, "monitoring", *COMBOS, *EXAMPLES]
# 1.30: the oldest version with everything used here (preStop `sleep` is beta and on by default
# from 1.30); and the newest schema the package ships.
K8S_VERSIONS = ["1.30.0", latest_version()]
GPU = "nvidia.com/gpu"
GPU_TARGETS = ["base", "overlays/gke", "overlays/eks"]


def apply_component(docs: list[dict], folder: Path) -> list[dict]:
    """What kustomize does with a `components:` entry: the component's resources join the
    objects rendered so far, then its patches apply to all of them (a patch whose target is
    missing fails, as in kustomize). Only the keys deploy/components use are accepted."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert spec["kind"] == "Component", folder
    assert spec["apiVersion"] == "kustomize.config.k8s.io/v1alpha1", folder
    unknown = set(spec) - {"apiVersion", "kind", "resources", "patches"}
    assert not unknown, f"{folder}: {sorted(unknown)} not implemented here"
    docs = copy.deepcopy(docs)
    for entry in spec.get("resources", []):
        path = folder / entry
        docs += render(path) if path.is_dir() else [
            d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in spec.get("patches", []):
        assert set(patch) == {"path"}, patch
        body = yaml.safe_load((folder / patch["path"]).read_text())
        ident = (body["kind"], body["metadata"]["name"])
        hits = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == ident]
        if len(hits) != 1:
            raise ValueError(f"{folder}/{patch['path']}: {len(hits)} targets for {ident}")
        docs[hits[0]] = strategic_merge(docs[hits[0]], body)
    seen = [(d["kind"], d["metadata"]["name"]) for d in docs]
    if len(seen) != len(set(seen)):
        raise ValueError(f"{folder}: duplicate objects {seen}")
    return docs


def render_target(target: str, deploy: Path = DEPLOY) -> list[dict]:
    """Objects of a target: a folder of deploy/, or 'folder+component+...' (the overlay with
    those components listed, in that order)."""
    folder, *components = target.split("+")
    docs = render(deploy / folder)
    for name in components:
        docs = apply_component(docs, deploy / "components" / name)
    return docs


def kubectl_render_target(target: str) -> list[dict] | None:
    """`kubectl kustomize` of the target; for a combination, of a kustomization that lists the
    overlay as its resource and the components (relative paths: kustomize refuses absolute)."""
    folder, *components = target.split("+")
    if not components:
        return kubectl_render(DEPLOY / folder)
    with tempfile.TemporaryDirectory() as tmp:
        rel = os.path.relpath(DEPLOY, tmp)
        spec = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": [f"{rel}/{folder}"],
                "components": [f"{rel}/components/{c}" for c in components]}
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(spec))
        try:
            return kubectl_render(Path(tmp))
        except subprocess.CalledProcessError as e:
            raise AssertionError(f"kubectl kustomize {target}: {e.stderr}") from e


@functools.cache
def _objects(target: str) -> tuple[dict, ...]:
    return tuple(render_target(target))


def objects(target: str) -> list[dict]:
    return copy.deepcopy(list(_objects(target)))


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def pod_spec(target: str) -> dict:
    return one(objects(target), "Deployment")["spec"]["template"]["spec"]


def container(target: str) -> dict:
    (c,) = pod_spec(target)["containers"]
    return c


def canonical(docs: list[dict]) -> dict:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


# ------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("target", TARGETS)
def test_python_renderer_agrees_with_kubectl_kustomize(target):
    reference = kubectl_render_target(target)
    if reference is None:
        pytest.skip("kubectl is not installed: nothing to compare the renderer with")
    assert canonical(objects(target)) == canonical(reference)


def test_overlays_change_what_they_should():
    base, gke, eks = (objects(t) for t in ("base", "overlays/gke", "overlays/eks"))
    assert "nodeSelector" not in pod_spec("base")
    assert pod_spec("overlays/gke")["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-l4"}
    terms = pod_spec("overlays/eks")["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = {e["key"] for t in terms for e in t["matchExpressions"]}
    assert keys == {"eks.amazonaws.com/instance-gpu-manufacturer",
                    "karpenter.k8s.aws/instance-gpu-manufacturer", "nvidia.com/gpu.present"}
    assert one(gke, "PersistentVolumeClaim")["spec"]["storageClassName"] == "standard-rwx"
    assert one(eks, "PersistentVolumeClaim")["spec"]["storageClassName"] == "efs-sc"
    assert "storageClassName" not in one(base, "PersistentVolumeClaim")["spec"]
    for target in ("overlays/gke", "overlays/eks"):
        c = container(target)
        assert c["env"] == container("base")["env"]  # patches merged, not replaced
        assert {v["name"] for v in c["volumeMounts"]} == {"model-cache", "dshm", "api-keys",
                                                         "tmp", "home"}
        # monitoring and autoscaling are opt-in: the overlay alone has none of them, and
        # listing the components adds them without touching the rest
        kinds = {d["kind"] for d in objects(target)}
        assert not {"ServiceMonitor", "ConfigMap", "HorizontalPodAutoscaler"} & kinds
        with_them = objects(combo(target, ("monitoring", "hpa")))
        assert {d["kind"] for d in with_them} == kinds | {
            "ServiceMonitor", "ConfigMap", "HorizontalPodAutoscaler"}
        assert canonical(objects(target)).items() <= canonical(with_them).items()


# ------------------------------------------------------------------------------ schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_manifests_validate_against_the_kubernetes_schema(target, version):
    checked = 0
    for doc in objects(target):
        if doc["kind"] == "LLMInferenceService":  # its pod template is a Pod spec
            doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template"},
                   "spec": doc["spec"]["template"]}
        elif doc["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue  # a custom resource: checked against its CRD's fields (below and shapes)
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_secret_example_validates(version):
    secret = yaml.safe_load((DEPLOY / "base" / "secret.example.yaml").read_text())
    kubernetes_validate.validate(secret, version, strict=True)
    env = {e["name"]: e for e in container("base")["env"]}
    ref = env["ALIGNSERVE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert "optional" not in ref  # no Secret, no pod: never an open API by accident
    (vol,) = [v for v in pod_spec("base")["volumes"] if v["name"] == "api-keys"]
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    assert {i["key"] for i in vol["secret"]["items"]} <= set(secret["stringData"])


def test_a_typo_fails_validation():
    # The validator must be able to fail: a misspelt field in the real Deployment.
    deployment = one(objects("base"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# API groups of the custom resources deploy/ uses (none in an overlay without components,
# except the LeaderWorkerSet that multinode-lws is made of).
CRD_GROUPS = {"monitoring.coreos.com", "leaderworkerset.x-k8s.io", "keda.sh",
              "gateway.networking.k8s.io", "inference.networking.k8s.io", "serving.kserve.io"}


# The fields of monitoring.coreos.com/v1 ServiceMonitor that deploy/ uses, as the CRD defines
# them (the CRD itself is not shipped offline); anything else is refused.
_DURATION = {"type": "string",
             "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
SERVICE_MONITOR = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": {"type": "object"}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": _DURATION, "scrapeTimeout": _DURATION}}},
            },
        },
    },
}


@pytest.mark.parametrize("target", [t for t in COMBOS if "monitoring" in t.split("+")])
def test_service_monitor_matches_its_crd_and_scrapes_the_service(target):
    docs = objects(target)
    monitor, service = one(docs, "ServiceMonitor"), named(docs, "Service", "alignserve")
    jsonschema.validate(monitor, SERVICE_MONITOR)
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


# ------------------------------------------------------------------------------ wiring


@pytest.mark.parametrize("target", ["overlays/gke", "overlays/local"])
def test_every_env_var_is_a_setting_and_every_value_is_valid(target):
    env = container(target)["env"]
    ours = {e["name"]: e for e in env if e["name"].startswith("ALIGNSERVE_")}
    fields = {f"ALIGNSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(ours) <= fields, set(ours) - fields
    # Build the Settings the pod would get (secrets replaced by a valid stand-in).
    values = {name[len("ALIGNSERVE_"):].lower(): e.get("value", "x" * 32)
              for name, e in ours.items()}
    s = Settings(**values)
    assert s.host == "0.0.0.0" and s.port == container("base")["ports"][0]["containerPort"]
    assert str(s.home) == "/models" and s.admin_key is not None
    mounts = {m["name"]: m["mountPath"] for m in container("base")["volumeMounts"]}
    assert str(s.api_keys_file).startswith(mounts["api-keys"] + "/")
    assert mounts["model-cache"] == str(s.home)


def test_gpu_dshm_cache_and_security():
    spec, c = pod_spec("base"), container("base")
    for target in GPU_TARGETS:
        res = container(target)["resources"]
        assert res["requests"][GPU] == res["limits"][GPU] == "1"
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    claim = vols["model-cache"]["persistentVolumeClaim"]["claimName"]
    assert claim == one(objects("base"), "PersistentVolumeClaim")["metadata"]["name"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["automountServiceAccountToken"] is False


def test_probes_point_at_real_routes():
    c = container("base")
    routes = {r.path for r in make_app().routes}
    port_names = {p["name"] for p in c["ports"]}
    for probe, path in [("startupProbe", "/health"), ("livenessProbe", "/health"),
                        ("readinessProbe", "/ready")]:
        get = c[probe]["httpGet"]
        assert get["path"] == path and path in routes and get["port"] in port_names


def test_grace_period_covers_pre_stop_and_drain():
    spec, c = pod_spec("base"), container("base")
    env = {e["name"]: e.get("value") for e in c["env"]}
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env["ALIGNSERVE_DRAIN_TIMEOUT_S"])
    # and room for the engine to stop before Kubernetes sends SIGKILL
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 10


def test_selectors_match():
    docs = objects(combo("base", ("monitoring", "hpa")))
    deployment, service, pdb, hpa = (one(docs, k) for k in (
        "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"))
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    port = service["spec"]["ports"][0]["targetPort"]
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert port in {p["name"] for p in c["ports"]}


# ------------------------------------------------------------------------------ metrics


def app_metric_names() -> set[str]:
    """Every sample name the app can expose (families and their type's suffixes)."""
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count",
                                                                 "_created"], "gauge": [""]}
    names = set()
    for family in make_app().state.registry.collect():
        names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def metric_names_in(text: str) -> set[str]:
    return set(re.findall(r"\b((?:alignserve|vllm):[a-zA-Z0-9_]+)", text))


def adapter_rules() -> list[dict]:
    values = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    return values["rules"]["custom"]


def test_hpa_metrics_are_served_by_the_adapter_from_real_series():
    hpa = one(objects(combo("base", ("monitoring", "hpa"))), "HorizontalPodAutoscaler")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    served = {}
    for rule in adapter_rules():
        (series,) = metric_names_in(rule["seriesQuery"])
        assert re.fullmatch(rule["name"]["matches"], series)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.Series>>" in rule["metricsQuery"]
        served[rule["name"]["as"]] = series
    assert wanted == set(served)
    ours = {s for s in served.values() if s.startswith("alignserve:")}
    assert ours and ours <= app_metric_names()
    # vllm:* series come from the engine; tests/integration/test_load_live.py checks them.


def test_dashboard_is_grafana_json_over_real_metrics():
    dash = json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    exprs = []
    for panel in dash["panels"]:
        assert {"type", "title", "gridPos", "targets"} <= set(panel)
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        exprs += [t["expr"] for t in panel["targets"]]
    used = set().union(*(metric_names_in(e) for e in exprs))
    ours = {m for m in used if m.startswith("alignserve:")}
    assert ours <= app_metric_names(), ours - app_metric_names()
    # every alignserve metric family appears on the dashboard
    families = {f.name for f in make_app().state.registry.collect()}
    shown = {f for f in families if any(m.startswith(f) for m in ours)}
    assert shown == families, families - shown
    config = one(objects("monitoring"), "ConfigMap")
    assert json.loads(config["data"]["alignserve-dashboard.json"]) == dash
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"


def dashboard_and_adapter_vllm_metrics() -> set[str]:
    """vllm:* names deploy/ relies on (checked against the real engine in integration)."""
    text = (DEPLOY / "monitoring" / "grafana-dashboard.json").read_text()
    text += (DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text()
    return {m for m in metric_names_in(text) if m.startswith("vllm:")}


def vllm_metric_names() -> set[str]:
    """Every sample name the installed vLLM exports, read from its metrics module's source
    (vllm/v1/metrics/loggers.py declares each family once; nothing is imported): counters
    as `_total`, histograms as `_bucket`/`_sum`/`_count`, gauges as they are."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    source = (Path(spec.submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py")
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""]}
    names = set()
    for kind, name in re.findall(r"_(counter|gauge|histogram)_cls\(\s*name=\"(vllm:\w+)\"",
                                 source.read_text()):
        names |= {name + s for s in suffixes[kind]}
    assert len(names) > 30, "vLLM's metrics module changed shape: update this parser"
    return names


def test_vllm_metrics_used_are_exported_by_the_installed_vllm():
    used = dashboard_and_adapter_vllm_metrics()
    exported = vllm_metric_names()
    assert used <= exported, used - exported
    # the engine panels the dashboard promises (issue 16): TTFT, ITL, KV cache, prefix cache,
    # preemptions, and the queue the HPA scales on
    assert {"vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
            "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total",
            "vllm:prefix_cache_queries_total", "vllm:num_preemptions_total",
            "vllm:num_requests_waiting"} <= used


# ------------------------------------------------------------------------------ scale-out shapes


def settings_of(c: dict) -> Settings:
    """The Settings a container's ALIGNSERVE_* env gives (secrets replaced by a stand-in)."""
    ours = {e["name"]: e for e in c["env"] if e["name"].startswith("ALIGNSERVE_")}
    fields = {f"ALIGNSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(ours) <= fields, set(ours) - fields
    return Settings(**{n[len("ALIGNSERVE_"):].lower(): e.get("value", "x" * 32)
                       for n, e in ours.items()})


def named(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_tensor_parallel_overlay_asks_for_tp_gpus_and_shared_memory():
    c, spec = container("overlays/tensor-parallel"), pod_spec("overlays/tensor-parallel")
    s = settings_of(c)
    res = c["resources"]
    assert int(res["requests"][GPU]) == int(res["limits"][GPU]) == s.tensor_parallel_size > 1
    assert s.distributed_executor_backend == "mp" and s.pipeline_parallel_size == 1
    (dshm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"]["medium"] == "Memory"
    assert int(dshm["emptyDir"]["sizeLimit"].removesuffix("Gi")) >= 16
    base_env = {e["name"] for e in container("base")["env"]}
    assert base_env <= {e["name"] for e in c["env"]}  # merged, not replaced


def test_reward_model_runs_on_its_own_pool_and_alignserve_scores_through_it():
    docs = objects("overlays/reward-model")
    rm = named(docs, "Deployment", "alignserve-rm")
    rm_svc, svc = named(docs, "Service", "alignserve-rm"), named(docs, "Service", "alignserve")
    rm_pod = rm["spec"]["template"]
    (vllm,) = rm_pod["spec"]["containers"]
    assert {"--runner=pooling", "--convert=classify"} <= set(vllm["args"])
    assert rm_pod["spec"]["nodeSelector"] == {"alignserve.io/pool": "reward-model"}
    assert vllm["resources"]["requests"][GPU] == "1"
    rm_labels = rm_pod["metadata"]["labels"]
    assert rm_svc["spec"]["selector"].items() <= rm_labels.items()
    assert not svc["spec"]["selector"].items() <= rm_labels.items()  # no policy traffic to it
    for kind in ("PodDisruptionBudget",):
        assert not one(docs, kind)["spec"]["selector"]["matchLabels"].items() <= rm_labels.items()
    # alignserve: remote:rm is the default reward, at the RM Service's name and port.
    app = named(docs, "Deployment", "alignserve")["spec"]["template"]["spec"]
    (c,) = app["containers"]
    s = settings_of(c)
    url = s.remote_scorer_urls()["rm"]
    port = rm_svc["spec"]["ports"][0]["port"]
    assert url == f"http://{rm_svc['metadata']['name']}:{port}"
    assert s.default_reward == "remote:rm"
    (wait,) = app["initContainers"]
    assert f"{url}/health" in wait["command"][-1]
    target = rm_svc["spec"]["ports"][0]["targetPort"]
    assert target in {p["name"] for p in vllm["ports"]}
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    # same volume, same path: alignserve finds the RM's tokenizer (one batched /classify)
    model = next(a.split("=", 1)[1] for a in vllm["args"] if a.startswith("--model="))
    (mount,) = [m for m in vllm["volumeMounts"] if m["name"] == "model-cache"]
    assert model.startswith(mount["mountPath"] + "/") and mount["mountPath"] == str(s.home)


# The fields of leaderworkerset.x-k8s.io/v1 LeaderWorkerSet that deploy/ uses; the pod templates
# inside are checked against the Kubernetes Pod schema.
LEADER_WORKER_SET = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["leaderWorkerTemplate"], "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "leaderWorkerTemplate": {
                    "type": "object", "additionalProperties": False,
                    "required": ["size", "workerTemplate"],
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "None"]},
                        "leaderTemplate": {"type": "object"},
                        "workerTemplate": {"type": "object"},
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_multinode_leader_worker_set(version):
    docs = objects("overlays/multinode-lws")
    assert "Deployment" not in {d["kind"] for d in docs}
    lws = one(docs, "LeaderWorkerSet")
    jsonschema.validate(lws, LEADER_WORKER_SET)
    tpl = lws["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": tpl[role]["metadata"],
               "spec": tpl[role]["spec"]}
        kubernetes_validate.validate(pod, version, strict=True)
    (leader,) = tpl["leaderTemplate"]["spec"]["containers"]
    (worker,) = tpl["workerTemplate"]["spec"]["containers"]
    s = settings_of(leader)
    gpus = int(leader["resources"]["limits"][GPU])
    assert gpus == int(worker["resources"]["limits"][GPU]) == s.tensor_parallel_size
    assert s.pipeline_parallel_size == tpl["size"] > 1  # one pipeline stage per node
    assert s.distributed_executor_backend == "ray"
    assert tpl["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert "ray start --head" in leader["command"][-1] and "alignserve serve" in leader["command"][-1]
    assert "LWS_GROUP_SIZE" in leader["command"][-1]
    assert "$LWS_LEADER_ADDRESS:6379" in worker["command"][-1]
    svc = one(docs, "Service")
    assert svc["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"],
                                       "role": "leader"}
    assert tpl["leaderTemplate"]["metadata"]["labels"]["role"] == "leader"
    assert svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in leader["ports"]}
    for c, spec in ((leader, tpl["leaderTemplate"]["spec"]), (worker, tpl["workerTemplate"]["spec"])):
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        claim = vols["model-cache"]["persistentVolumeClaim"]["claimName"]
        assert claim == one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


# ------------------------------------------------------------------------------ hardening


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(name, pod spec) of every Deployment, LeaderWorkerSet role and LLMInferenceService."""
    out = []
    for d in docs:
        if d["kind"] == "Deployment":
            out.append((d["metadata"]["name"], d["spec"]["template"]["spec"]))
        elif d["kind"] == "LLMInferenceService":
            out.append((d["metadata"]["name"], d["spec"]["template"]))
        elif d["kind"] == "LeaderWorkerSet":
            tpl = d["spec"]["leaderWorkerTemplate"]
            out += [(f"{d['metadata']['name']}/{role}", tpl[role]["spec"])
                    for role in ("leaderTemplate", "workerTemplate") if role in tpl]
    return out


def quantity_bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}
    for unit, factor in units.items():
        if q.endswith(unit):
            return int(float(q[: -len(unit)]) * factor)
    return int(q)


WORKLOAD_TARGETS = [t for t in TARGETS if t != "monitoring"]
# Everything rendered from base/network-policies (the KServe example is KServe's workload: its
# namespace's policies are the operator's).
POLICY_TARGETS = [t for t in WORKLOAD_TARGETS if t not in EXAMPLES]


@pytest.mark.parametrize("target", WORKLOAD_TARGETS)
def test_read_only_roots_and_bounded_scratch_space(target):
    pods = pod_templates(objects(target))
    assert pods
    for name, spec in pods:
        containers = spec["containers"] + spec.get("initContainers", [])
        for c in containers:
            where = f"{target} {name}/{c['name']}"
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            res = c["resources"]
            assert "ephemeral-storage" in res["requests"], where
            assert quantity_bytes(res["limits"]["ephemeral-storage"]) >= quantity_bytes(
                res["requests"]["ephemeral-storage"]), where
        empty = {v["name"]: v["emptyDir"] for v in spec["volumes"] if "emptyDir" in v}
        assert all("sizeLimit" in e for e in empty.values()), (target, name, empty)
        # Disk-backed emptyDirs count against the pod's ephemeral-storage: the containers'
        # limits cover them, so a full scratch dir evicts the pod, not the node's other pods.
        on_disk = sum(quantity_bytes(e["sizeLimit"]) for e in empty.values()
                      if e.get("medium") != "Memory")
        limits = sum(quantity_bytes(c["resources"]["limits"]["ephemeral-storage"])
                     for c in spec["containers"])
        assert limits > on_disk, (target, name)
        # /tmp is writable scratch space in every container
        for c in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts.get("/tmp") in empty, (target, name, c["name"])


def test_every_cache_the_engine_writes_is_on_a_writable_volume():
    for target in ("base", "overlays/multinode-lws", "overlays/reward-model", "overlays/local",
                   "examples/kserve"):
        for name, spec in pod_templates(objects(target)):
            writable = {m["mountPath"] for c in spec["containers"] for m in c["volumeMounts"]
                        if not m.get("readOnly")}
            for c in spec["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                for var in ("HOME", "HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR",
                            "TORCHINDUCTOR_CACHE_DIR"):
                    path = env.get(var)
                    assert path, (target, name, var)
                    assert any(path == w or path.startswith(w + "/") for w in writable), (
                        target, name, var, path)
                assert env.get("VLLM_NO_USAGE_STATS") == "1"


@pytest.mark.parametrize("target", TARGETS)
def test_no_latest_tags(target):
    """Images carry a version tag or a digest; `:latest` (or no tag) is refused. Pin digests
    with `kustomize edit set image` (deploy/README.md)."""
    for name, spec in pod_templates(objects(target)):
        for c in spec["containers"] + spec.get("initContainers", []):
            image = c["image"]
            ref = image.rsplit("/", 1)[-1]
            if "@sha256:" in image:
                assert re.fullmatch(r".+@sha256:[0-9a-f]{64}", image), image
                continue
            assert ":" in ref, f"{target} {name}: {image} has no tag"
            assert ref.rsplit(":", 1)[1] != "latest", f"{target} {name}: {image}"


def policies(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}


def selects(spec: dict, labels: dict) -> bool:
    return spec["podSelector"].get("matchLabels", {}).items() <= labels.items()


DNS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
       "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
DNS_PORTS = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]


def allowed(pols: dict[str, dict], labels: dict, direction: str) -> list[dict]:
    """Every rule that applies to pods with these labels, in one direction."""
    key = "ingress" if direction == "Ingress" else "egress"
    return [rule for spec in pols.values() if selects(spec, labels)
            and direction in spec["policyTypes"] for rule in spec.get(key, [])]


@pytest.mark.parametrize("target", POLICY_TARGETS)
def test_network_policies_deny_by_default(target):
    docs = objects(target)
    pols = policies(docs)
    deny = pols["default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    # no rule anywhere allows everyone: each peer names pods, namespaces or both
    for name, spec in pols.items():
        for rule in spec.get("ingress", []) + spec.get("egress", []):
            peers = rule.get("from", rule.get("to"))
            assert peers, (target, name, rule)
            for peer in peers:
                assert "ipBlock" not in peer, (target, name)
                assert any(sel.get("matchLabels") for sel in peer.values()), (target, name, peer)


def alignserve_pod_labels(docs: list[dict]) -> dict:
    for d in docs:
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "alignserve":
            return d["spec"]["template"]["metadata"]["labels"]
        if d["kind"] == "LeaderWorkerSet":
            labels = d["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]
            return {**labels, "leaderworkerset.sigs.k8s.io/name": d["metadata"]["name"]}
    raise AssertionError("no alignserve workload")


@pytest.mark.parametrize("target", POLICY_TARGETS)
def test_alignserve_takes_traffic_from_the_ingress_controller_and_prometheus_only(target):
    docs = objects(target)
    pols, labels = policies(docs), alignserve_pod_labels(docs)
    ports = {p["name"] for _, spec in pod_templates(docs) for c in spec["containers"]
             for p in c.get("ports", [])}
    ingress = allowed({k: v for k, v in pols.items() if k != "alignserve-ray"}, labels, "Ingress")
    if "inference-pool" in target.split("+"):
        # the endpoint picker scrapes /metrics on the API port (this namespace only)
        epp = {"podSelector": {"matchLabels": {"alignserve.io/endpoint-picker": "true"}}}
        ingress.remove({"from": [epp], "ports": [{"port": "http", "protocol": "TCP"}]})
    (rule,) = ingress
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}] and "http" in ports
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"alignserve.io/ingress": "true"}},
         "podSelector": {"matchLabels": {"alignserve.io/ingress": "true"}}},
        {"namespaceSelector": {"matchLabels": {"alignserve.io/monitoring": "true"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    egress = allowed({k: v for k, v in pols.items() if k != "alignserve-ray"}, labels, "Egress")
    by_peer = {json.dumps(r["to"], sort_keys=True): r["ports"] for r in egress}
    assert by_peer.pop(json.dumps([DNS], sort_keys=True)) == DNS_PORTS
    otlp = [{"namespaceSelector": {"matchLabels": {"alignserve.io/monitoring": "true"}},
             "podSelector": {"matchLabels": {"app.kubernetes.io/name": "opentelemetry-collector"}}}]
    assert by_peer.pop(json.dumps(otlp, sort_keys=True)) == [
        {"port": 4317, "protocol": "TCP"}, {"port": 4318, "protocol": "TCP"}]
    if target.split("+")[0] == "overlays/reward-model":
        rm = named(docs, "Deployment", "alignserve-rm")["spec"]["template"]
        (vllm,) = rm["spec"]["containers"]
        rm_peer = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "alignserve-rm"}}}]
        port = vllm["ports"][0]["containerPort"]
        assert by_peer.pop(json.dumps(rm_peer, sort_keys=True)) == [
            {"port": port, "protocol": "TCP"}]
    assert by_peer == {}  # nothing else: no internet, no Kubernetes API


def test_reward_model_server_answers_alignserve_only_and_sends_nothing():
    docs = objects("overlays/reward-model")
    pols = policies(docs)
    rm = named(docs, "Deployment", "alignserve-rm")["spec"]["template"]
    (vllm,) = rm["spec"]["containers"]
    app_labels = alignserve_pod_labels(docs)
    (rule,) = allowed(pols, rm["metadata"]["labels"], "Ingress")
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # this namespace only
    assert peer["podSelector"]["matchLabels"].items() <= app_labels.items()
    assert not peer["podSelector"]["matchLabels"].items() <= rm["metadata"]["labels"].items()
    assert rule["ports"] == [{"port": vllm["ports"][0]["containerPort"], "protocol": "TCP"}]
    assert allowed(pols, rm["metadata"]["labels"], "Egress") == []


def test_reward_model_server_has_a_key_and_a_read_only_model_volume():
    docs = objects("overlays/reward-model")
    rm = named(docs, "Deployment", "alignserve-rm")["spec"]
    spec = rm["template"]["spec"]
    (vllm,) = spec["containers"]
    (mount,) = [m for m in vllm["volumeMounts"] if m["name"] == "model-cache"]
    assert mount["readOnly"] is True
    (vol,) = [v for v in spec["volumes"] if v["name"] == "model-cache"]
    assert vol["persistentVolumeClaim"]["readOnly"] is True  # no fsGroup chown of the weights
    # the key: vLLM reads VLLM_API_KEY as --api-key; from a Secret, never a literal, not optional
    env = {e["name"]: e for e in vllm["env"]}
    assert not any(a.startswith("--api-key") for a in vllm["args"])
    ref = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert "optional" not in ref
    example = yaml.safe_load((DEPLOY / "overlays" / "reward-model" / "secret.example.yaml")
                             .read_text())
    kubernetes_validate.validate(example, K8S_VERSIONS[-1], strict=True)
    assert ref["name"] == example["metadata"]["name"] and ref["key"] in example["stringData"]
    # alignserve sends the same key once its settings have a field for it
    if "remote_scorer_api_key" in Settings.model_fields:
        app = named(docs, "Deployment", "alignserve")["spec"]["template"]["spec"]
        (c,) = app["containers"]
        app_env = {e["name"]: e for e in c["env"]}
        assert app_env["ALIGNSERVE_REMOTE_SCORER_API_KEY"]["valueFrom"]["secretKeyRef"] == ref


def test_ray_talks_only_within_its_leader_worker_set():
    docs = objects("overlays/multinode-lws")
    pols = policies(docs)
    lws = one(docs, "LeaderWorkerSet")
    group = {"leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"]}
    tpl = lws["spec"]["leaderWorkerTemplate"]
    worker = {**tpl["workerTemplate"]["metadata"]["labels"], **group}
    leader = alignserve_pod_labels(docs)
    ray = pols["alignserve-ray"]
    assert ray["podSelector"] == {"matchLabels": group}
    (rule,) = ray["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": group}}]
    # workers: nothing but their group in, their group and DNS out
    assert allowed(pols, worker, "Ingress") == ray["ingress"]
    assert [r["to"] for r in allowed(pols, worker, "Egress")] == [
        [{"podSelector": {"matchLabels": group}}], [DNS]]
    assert not selects(pols["alignserve"], worker)  # no API ingress to workers
    assert selects(ray, leader) and selects(pols["alignserve"], leader)
