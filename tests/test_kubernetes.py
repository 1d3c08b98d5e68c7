"""The Kubernetes manifests (deploy/kubernetes): valid against the real API schemas (kubernetes-validate, offline,
strict: unknown fields are errors), and consistent with our command line and with each other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ef21.__main__ import build_parser

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
# The oldest release we claim (Indexed Jobs are GA since 1.24) and the newest the validator knows.
VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def by_kind() -> dict[str, dict]:
    found: dict[str, dict] = {}
    for _, d in documents():
        assert d["kind"] not in found, f"two {d['kind']}s"
        found[d["kind"]] = d
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version):
    docs = documents()
    assert sorted(d["kind"] for _, d in docs) == ["Job", "Service", "StatefulSet"]
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_the_validator_rejects_a_broken_manifest():
    """The check above can fail: a misspelt field and a wrong type are both caught."""
    sts = by_kind()["StatefulSet"]
    broken = {**sts, "spec": {**sts["spec"], "replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)
    job = by_kind()["Job"]
    broken = {**job, "spec": {**job["spec"], "completions": "four"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def parse(args: list[str], env: dict[str, str] | None = None):
    """The container's arguments as our CLI reads them (the image's entrypoint is `ef21`), with Kubernetes'
    $(VAR) expansion of the declared environment applied first."""
    env = env or {}
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]
    return build_parser().parse_args(expanded)


def test_master_statefulset_service_and_probes_agree():
    k = by_kind()
    sts, svc = k["StatefulSet"], k["Service"]
    c = container(sts)
    ns = parse(c["args"])
    assert ns.command == "master" and ns.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": ns.port, "status": ns.status_port}
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]} == {"grpc": "grpc", "status": "status"}
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] and sts["spec"]["replicas"] == 1
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "status"}
    assert not ns.status_token  # probes carry no token; /healthz needs none anyway
    # The run's files live on the claim, so a rescheduled pod resumes from its checkpoint and keeps its log.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    state = Path(mounts[claim["metadata"]["name"]])
    for path in (ns.checkpoint, ns.log, ns.out, ns.plot):
        assert path is not None and state in path.parents, path
    assert ns.resume_if_exists and ns.linger and ns.join_timeout > 0
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]


def test_workers_are_an_indexed_job_whose_index_is_the_rank():
    k = by_kind()
    job, sts, svc = k["Job"], k["StatefulSet"], k["Service"]
    master = parse(container(sts)["args"])
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == master.workers
    c = container(job)
    (index_env,) = [e for e in c["env"] if e["name"] == "JOB_COMPLETION_INDEX"]
    assert index_env["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    for rank in (0, master.workers - 1):
        ns = parse(c["args"], {"JOB_COMPLETION_INDEX": str(rank)})
        assert ns.command == "worker" and ns.rank == rank
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert ns.master == f"{svc['metadata']['name']}:{grpc_port}" and grpc_port == master.port
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]


def test_the_token_is_one_secret_readable_by_the_image_user():
    k = by_kind()
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    secrets = set()
    for workload in (k["StatefulSet"], k["Job"]):
        pod = workload["spec"]["template"]["spec"]
        c = container(workload)
        ns = parse(c["args"], {"JOB_COMPLETION_INDEX": "0"})
        assert pod["securityContext"]["runAsUser"] == uid
        # Secret files belong to root and the pod's fsGroup: group-readable is what lets the user read them.
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
        (vol,) = [v for v in pod["volumes"] if "secret" in v]
        assert vol["secret"]["defaultMode"] == 0o440
        secrets.add(vol["secret"]["secretName"])
        mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == vol["name"])
        assert ns.token_file.parent == Path(mount) and ns.token is None
    assert len(secrets) == 1


def tier_documents() -> dict[str, list[dict]]:
    """deploy/kubernetes/aggregators/: the aggregator tier's manifests, by kind."""
    out: dict[str, list[dict]] = {}
    for path in sorted((DEPLOY / "aggregators").glob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d is not None:
                out.setdefault(d["kind"], []).append(d)
    return out


def test_the_aggregator_tier_is_valid_and_consistent():
    """Valid against the schemas; the master runs --aggregators F; the aggregators' StatefulSet has F pods whose
    index is the block; each block's worker Job dials its aggregator's stable name and has the block's size."""
    from ef21.engine.tree import Tree

    docs = tier_documents()
    for kind, items in docs.items():
        for doc in items:
            kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
    masters = [s for s in docs["StatefulSet"] if s["metadata"]["name"] == "ef21-master"]
    aggs = [s for s in docs["StatefulSet"] if s["metadata"]["name"] == "ef21-aggregator"]
    assert len(masters) == len(aggs) == 1
    m = parse(container(masters[0])["args"])
    assert m.aggregators == 2 and m.checkpoint is None and not m.resume_if_exists
    agg = aggs[0]
    assert agg["spec"]["replicas"] == m.aggregators
    service = next(s for s in docs["Service"] if s["metadata"]["name"] == agg["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # headless: a stable name per pod
    tree = Tree(m.workers, m.aggregators)
    jobs = sorted(docs["Job"], key=lambda j: j["metadata"]["name"])
    assert len(jobs) == m.aggregators
    for j, job in enumerate(jobs):
        a = parse(container(agg)["args"], {"POD_INDEX": str(j)})
        assert a.command == "aggregator" and a.block == j and a.master == "ef21-master:50051"
        # A StatefulSet restarts a pod that exits: the aggregator stays after the run, as the master (--linger).
        assert a.linger and m.linger
        w = parse(container(job)["args"])
        assert w.master == f"{agg['metadata']['name']}-{j}.{service['metadata']['name']}:{a.port}"
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == len(tree.block(j))
