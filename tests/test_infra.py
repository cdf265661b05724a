"""infra/ checked offline against real references, so a manifest that Kubernetes or
KubeRay would refuse, or that names a flag framekv does not have, fails here first.

- Every manifest under infra/kuberay/ parses into Kubernetes objects (ConfigMaps that
  carry a manifest, the CronJob's RayJob template, count as one too). The core kinds
  validate against the schemas the kubernetes-validate package ships (strict: an
  unknown field fails), for the oldest and a recent Kubernetes this targets.
- RayCluster, RayJob and RayCronJob validate against infra/kuberay/schemas/: our own
  closed schemas of the KubeRay 1.7 fields we use, whose pod templates are Kubernetes'
  own definitions (kubernetes-validate's). Both validations are shown to reject typos.
- KubeRay's admission rules (its validation.go) that these specs touch, and infra's
  choices: the cluster shape, the object store below /dev/shm, resources on every
  container, S3 credentials, the job limits, one cluster spec in all four places.
- Every `python -m MODULE` named in infra/ exists and each --flag given to it is in
  `python -m MODULE --help`; every rayStartParams key is a `ray start` option; the
  nightly config passes the validation `python -m jobs.nightly` runs.
- The Dockerfile against the Makefile (torch pin, extras) and pyproject.toml; one image
  tag, pyproject's version, everywhere.
- The CronJob's shell script run against a stand-in kubectl (and real jq), and, marked
  slow, infra/local/up.sh and down.sh for real.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from referencing import Registry, Resource


REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
SCHEMAS = KUBERAY / "schemas"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE_REPO = "ghcr.io/framekv/framekv"
K8S_VERSIONS = ("1.30.0", "1.34.0")  # the oldest targeted (CronJob timeZone, podFailurePolicy) and a recent one
RAY_SCHEMAS = {"RayCluster": "raycluster.schema.json", "RayJob": "rayjob.schema.json",
               "RayCronJob": "raycronjob.schema.json"}
CORE_KINDS = {"ConfigMap", "CronJob", "Role", "RoleBinding", "Secret", "ServiceAccount"}
K8S_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
RAY_BIN = Path(sys.executable).with_name("ray")


@dataclass(frozen=True)
class Manifest:
    where: str  # file#document, and :key for a manifest carried in a ConfigMap
    doc: dict


def load_manifests() -> list[Manifest]:
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d is not None):
            where = f"{path.name}#{i}"
            found.append(Manifest(where, doc))
            for key, text in (doc.get("data") or {}).items() if doc.get("kind") == "ConfigMap" else ():
                inner = yaml.safe_load(text)
                if isinstance(inner, dict) and {"apiVersion", "kind"} <= inner.keys():
                    found.append(Manifest(f"{where}:{key}", inner))
    return found


MANIFESTS = load_manifests()


def of_kind(*kinds: str) -> list[Manifest]:
    return [m for m in MANIFESTS if m.doc["kind"] in kinds]


def one(kind: str, name: str) -> dict:
    [doc] = [m.doc for m in of_kind(kind) if m.doc["metadata"]["name"] == name]
    return doc


def job_specs() -> list[tuple[str, dict]]:
    """(where, RayJob spec) of every RayJob and RayCronJob template."""
    return ([(m.where, m.doc["spec"]) for m in of_kind("RayJob")]
            + [(m.where, m.doc["spec"]["jobTemplate"]) for m in of_kind("RayCronJob")])


def cluster_specs() -> list[tuple[str, dict]]:
    return [(m.where, m.doc["spec"]) for m in of_kind("RayCluster")] + [
        (where, spec["rayClusterSpec"]) for where, spec in job_specs()]


def ray_groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group) of the head and every worker group of a RayCluster spec."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template: Ray groups, submitters, the CronJob's pod."""
    pods = [(f"{where} {name}", group["template"]["spec"])
            for where, spec in cluster_specs() for name, group in ray_groups(spec)]
    pods += [(f"{where} submitter", spec["submitterPodTemplate"]["spec"])
             for where, spec in job_specs() if "submitterPodTemplate" in spec]
    pods += [(m.where, m.doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]) for m in of_kind("CronJob")]
    return pods


def by_where(pairs: list[tuple[str, dict]]) -> list:
    """(where, spec) pairs as pytest parameters named by where."""
    return [pytest.param(where, spec, id=where) for where, spec in pairs]


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


QUANTITY = re.compile(r"^([0-9.]+)(Ki|Mi|Gi|Ti|k|M|G|T|m)?$")
UNITS = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9,
         "T": 1e12, "m": 1e-3}


def quantity(value) -> float:
    """A Kubernetes quantity ("16", "500m", "8Gi", 1) as a number (bytes, cores)."""
    match = QUANTITY.match(str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * UNITS[match.group(2)]


# ---- 1. every manifest parses; core kinds against Kubernetes' schemas -------------------

@pytest.mark.parametrize("path", sorted(KUBERAY.glob("*.yaml")), ids=lambda p: p.name)
def test_manifest_file_parses_into_known_kinds(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name}: no documents"
    for doc in docs:
        assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path.name}: {doc!r:.80}"
        assert doc["kind"] in CORE_KINDS | RAY_SCHEMAS.keys(), f"{path.name}: {doc['kind']} is validated by no test"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("manifest", of_kind(*CORE_KINDS), ids=lambda m: m.where)
def test_kubernetes_kinds_validate_strictly(manifest, version):
    kubernetes_validate.validate(manifest.doc, version, strict=True)


def test_kubernetes_validation_rejects_a_misspelt_field():
    cronjob = copy.deepcopy(one("CronJob", "framekv-nightly"))
    kubernetes_validate.validate(cronjob, K8S_VERSIONS[0], strict=True)
    cronjob["spec"]["concurrencyPolicyy"] = cronjob["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cronjob, K8S_VERSIONS[0], strict=True)


# ---- 2. KubeRay kinds against our committed schemas ------------------------------------

def k8s_definitions(version: str) -> dict:
    """The strict Kubernetes definitions kubernetes-validate ships (their $id is K8S_DEFINITIONS_ID)."""
    path = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    return json.loads((path / "_definitions.json").read_text())


@functools.cache
def ray_validator(kind: str, version: str) -> jsonschema.Draft202012Validator:
    definitions = k8s_definitions(version)
    assert definitions["$id"] == K8S_DEFINITIONS_ID
    registry = Registry().with_resource(K8S_DEFINITIONS_ID, Resource.from_contents(definitions))
    for name in RAY_SCHEMAS.values():  # the schemas refer to each other by file name
        registry = registry.with_resource(name, Resource.from_contents(json.loads((SCHEMAS / name).read_text())))
    schema = json.loads((SCHEMAS / RAY_SCHEMAS[kind]).read_text())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def ray_errors(doc: dict, version: str = K8S_VERSIONS[0]) -> list[str]:
    errors = ray_validator(doc["kind"], version).iter_errors(doc)
    return sorted(f"{e.json_path}: {e.message[:200]}" for e in errors)


@pytest.mark.parametrize("name", sorted(RAY_SCHEMAS.values()))
def test_committed_schema_is_valid_json_schema(name):
    jsonschema.Draft202012Validator.check_schema(json.loads((SCHEMAS / name).read_text()))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("manifest", of_kind(*RAY_SCHEMAS), ids=lambda m: m.where)
def test_kuberay_kinds_validate_against_committed_schemas(manifest, version):
    assert ray_errors(manifest.doc, version) == []


def _worker(doc: dict, group: str) -> dict:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == group)


TYPOS = {  # a mistake -> (manifest to break, how)
    "misspelt worker group field": ("RayCluster", lambda d: _worker(d, "cpu-decode").update(replcias=2)),
    "object store given in Gi": ("RayCluster", lambda d: _worker(d, "cpu-decode")["rayStartParams"].update(
        {"object-store-memory": "8Gi"})),
    "rayStartParams value not a string": ("RayCluster", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update(
        {"num-cpus": 0})),
    "misspelt container field (Kubernetes' schema)": ("RayCluster", lambda d: d["spec"]["headGroupSpec"]["template"][
        "spec"]["containers"][0].update(resource={})),
    "misspelt RayJob field": ("RayJob", lambda d: d["spec"].update(shutdownAfterJobFinish=True)),
    "unknown submission mode": ("RayJob", lambda d: d["spec"].update(submissionMode="K8sJob")),
    "RayCronJob name over 36 characters": ("RayCronJob", lambda d: d["metadata"].update(name="framekv-" + "n" * 29)),
    "time zone in the schedule": ("RayCronJob", lambda d: d["spec"].update(schedule="CRON_TZ=UTC 0 2 * * *")),
}


@pytest.mark.parametrize("typo", TYPOS)
def test_committed_schemas_reject_a_typo(typo):
    kind, break_it = TYPOS[typo]
    doc = copy.deepcopy(of_kind(kind)[0].doc)
    assert ray_errors(doc) == []
    break_it(doc)
    assert ray_errors(doc), f"{typo}: accepted"


# ---- KubeRay's admission rules and infra's own choices ---------------------------------

def admission_errors(spec: dict) -> list[str]:
    """KubeRay 1.7's ValidateRayClusterSpec rules that these specs touch."""
    errors = []
    v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    if len(set(names)) != len(names):
        errors.append(f"worker group names repeat: {names}")
    for name, group in ray_groups(spec):
        pod = group["template"]["spec"]
        if not pod.get("containers"):
            errors.append(f"{name}: no container")
        if v2 and pod.get("restartPolicy", "Never") != "Never":
            errors.append(f"{name}: restartPolicy must be Never or unset with autoscaler v2")
        if name == "head":
            continue
        if group["minReplicas"] > group["maxReplicas"]:
            errors.append(f"{name}: minReplicas {group['minReplicas']} > maxReplicas {group['maxReplicas']}")
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            errors.append(f"{name}: replicas outside [minReplicas, maxReplicas]")
        if "idleTimeoutSeconds" in group and not v2:
            errors.append(f"{name}: idleTimeoutSeconds needs autoscalerOptions.version v2")
    return errors


def job_admission_errors(spec: dict) -> list[str]:
    """KubeRay 1.7's ValidateRayJobSpec rules that these specs touch."""
    errors = []
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        errors.append("ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        errors.append("backoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode" and "submitterPodTemplate" in spec:
        errors.append("SidecarMode does not take a submitterPodTemplate")
    return errors + admission_errors(spec["rayClusterSpec"])


@pytest.mark.parametrize("where,spec", by_where(job_specs()))
def test_kuberay_admission_rules_hold(where, spec):
    assert job_admission_errors(spec) == []


def test_admission_rules_catch_what_kuberay_refuses():
    _, spec = job_specs()[0]
    broken = copy.deepcopy(spec)
    broken["rayClusterSpec"]["autoscalerOptions"].pop("version")
    broken["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 99
    broken["submissionMode"] = "SidecarMode"
    errors = " | ".join(job_admission_errors(broken))
    for needle in ("idleTimeoutSeconds needs", "minReplicas 99 >", "SidecarMode"):
        assert needle in errors


def gpus(container: dict) -> float:
    return quantity(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("where,spec", by_where(cluster_specs()))
def test_cluster_shape(where, spec):
    """Head: driver only; one autoscaled GPU group that starts at full size; CPU decode."""
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert not any(gpus(c) for c in head["template"]["spec"]["containers"])
    gpu_groups = [g for g in spec["workerGroupSpecs"] if any(gpus(c) for c in g["template"]["spec"]["containers"])]
    assert len(gpu_groups) == 1, "one GPU group: encode"
    [gpu] = gpu_groups
    [worker] = gpu["template"]["spec"]["containers"]
    assert gpus(worker) == 1 and quantity(worker["resources"]["requests"]["nvidia.com/gpu"]) == 1
    # the encode pool is sized from the GPUs present when a run starts (pipeline/ingest.py)
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == gpu["maxReplicas"] >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["template"]["spec"][
        "tolerations"]
    assert any(g is not gpu for g in spec["workerGroupSpecs"]), "a CPU group for decode"


@pytest.mark.parametrize("where,spec", by_where(cluster_specs()))
def test_object_store_fits_in_dev_shm_and_memory(where, spec):
    for name, group in ray_groups(spec):
        pod = group["template"]["spec"]
        store = int(group["rayStartParams"]["object-store-memory"])
        [ray] = [c for c in pod["containers"] if c["name"].startswith("ray-")]
        [mount] = [m for m in ray["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory", f"{name}: /dev/shm must be memory"
        shm = quantity(volume["emptyDir"]["sizeLimit"])
        assert store < shm < quantity(ray["resources"]["limits"]["memory"]), f"{name}: store {store}, shm {shm}"


@pytest.mark.parametrize("where,pod", by_where(pod_specs()))
def test_every_container_has_requests_and_limits(where, pod):
    for c in containers(pod):
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= c["resources"].get(kind, {}).keys(), f"{c['name']}: {kind}"
        assert gpus(c) == quantity(c["resources"]["requests"].get("nvidia.com/gpu", 0))
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_autoscaler_container_has_resources():
    for where, spec in cluster_specs():
        assert {"requests", "limits"} <= spec["autoscalerOptions"]["resources"].keys(), where


@pytest.mark.parametrize("where,spec", by_where(cluster_specs()))
def test_s3_credentials_from_secret_or_service_account(where, spec):
    """Keys from the Secret framekv-s3, all optional so IRSA works without it; the
    ServiceAccount every Ray pod runs as is defined in serviceaccount.yaml."""
    for name, group in ray_groups(spec):
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "framekv"
        [ray] = [c for c in pod["containers"] if c["name"].startswith("ray-")]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in ray["env"] if "valueFrom" in e}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            assert refs[key] == {"name": "framekv-s3", "key": key, "optional": True}, f"{name}: {key}"
    assert one("ServiceAccount", "framekv")


def test_nightly_config_is_mounted_where_the_entrypoint_reads_it():
    config = one("ConfigMap", "framekv-nightly-config")
    nightly = [spec["entrypoint"] for _, spec in job_specs() if "jobs.nightly" in spec["entrypoint"]]
    assert nightly
    for where, spec in cluster_specs():
        pod = spec["headGroupSpec"]["template"]["spec"]
        [volume] = [v for v in pod["volumes"] if "configMap" in v]
        assert volume["configMap"]["name"] == config["metadata"]["name"], where
        [mount] = [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == volume["name"]]
        files = {f"{mount['mountPath']}/{key}" for key in config["data"]}
        for entrypoint in nightly:
            assert entrypoint.split()[-1] in files, f"{where}: {entrypoint} reads no mounted file"


@pytest.mark.parametrize("where,spec", by_where(job_specs()))
def test_job_limits(where, spec):
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["backoffLimit"] >= 1, "a lost head is retried"
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    if "jobs.nightly" in spec["entrypoint"]:  # daily: over before the next night
        assert spec["activeDeadlineSeconds"] + spec["preRunningDeadlineSeconds"] < 24 * 3600


def test_one_cluster_spec_everywhere():
    """The RayJob, the RayCronJob and the CronJob's template embed raycluster.yaml's spec."""
    [(_, reference)] = [(w, s) for w, s in cluster_specs() if w.startswith("raycluster.yaml")]
    for where, spec in cluster_specs():
        assert spec == reference, f"{where} differs from raycluster.yaml"
    [cron] = of_kind("RayCronJob")
    [template] = [m.doc for m in of_kind("RayJob") if ":" in m.where]
    assert template["spec"] == cron.doc["spec"]["jobTemplate"]


def test_both_nightly_schedules_agree():
    cron = one("CronJob", "framekv-nightly")["spec"]
    ray_cron = of_kind("RayCronJob")[0].doc["spec"]
    assert (cron["schedule"], cron["timeZone"]) == (ray_cron["schedule"], ray_cron["timeZone"])
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["startingDeadlineSeconds"] > 0
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    job = ray_cron["jobTemplate"]
    assert cron["jobTemplate"]["spec"]["activeDeadlineSeconds"] > job["activeDeadlineSeconds"] + job[
        "preRunningDeadlineSeconds"], "the waiting pod outlives the RayJob it waits for"


# ---- 3. entry points and flags ----------------------------------------------------------

PYTHON_M = re.compile(r"(?:^|[\s;&|(`'\"])python[0-9.]*\s+-m\s+([A-Za-z_][\w.]*)([^;&|`'\")\n]*)")
FLAG = re.compile(r"(?<!\S)(--[a-z][a-z0-9-]*)")


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [" ".join(node)] if all(isinstance(v, str) for v in node) else [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def infra_commands() -> dict[str, set[str]]:
    """module -> the --flags given to it, over every `python -m` in infra/: manifests'
    parsed strings (folded entry points, container commands), and the logical lines
    (backslash continuations joined) of every other text file."""
    texts = [s for m in MANIFESTS for s in strings(m.doc)]
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix not in (".yaml", ".json")):
        texts += path.read_text().replace("\\\n", " ").splitlines()
    found: dict[str, set[str]] = {}
    for text in texts:
        for module, rest in PYTHON_M.findall(text):
            found.setdefault(module, set()).update(FLAG.findall(rest))
    return found


COMMANDS = infra_commands()


def test_infra_names_the_entry_points_it_runs():
    assert {"jobs.ingest", "jobs.nightly"} <= COMMANDS.keys()
    assert {"--index", "--address", "--prune", "--max-prune", "--json"} <= COMMANDS["jobs.ingest"]


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_entry_point_exists_and_takes_its_flags(module):
    assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"python -m {module} --help: {run.stderr[-2000:]}"
    unknown = {f for f in COMMANDS[module] if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", run.stdout)}
    assert not unknown, f"python -m {module} has no {sorted(unknown)}"


def test_ray_start_params_are_ray_start_options():
    help_text = subprocess.run([str(RAY_BIN), "start", "--help"], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}).stdout
    keys = {k for _, spec in cluster_specs() for _, g in ray_groups(spec) for k in g["rayStartParams"]}
    assert keys and {k for k in keys if not re.search(rf"(?<![\w-])--{k}(?![\w-])", help_text)} == set()


def test_nightly_config_validates_as_jobs_nightly_reads_it(tmp_path):
    """The ConfigMap's YAML passes the validation `python -m jobs.nightly` runs first, and
    means what its comments say (`framekv ingest`'s settings of the same names)."""
    from pipeline.nightly import NightlyConfig

    path = tmp_path / "nightly.yaml"
    path.write_text(one("ConfigMap", "framekv-nightly-config")["data"]["nightly.yaml"])
    cfg = NightlyConfig.load(path)
    ingest = cfg.ingest_config(cfg.sources[0], cfg.reindex_budget.videos_per_night)
    assert (ingest.prune, ingest.max_prune, ingest.max_attempts) == (True, 0.1, 3)
    assert ingest.prune_retention == 7 * 86400 and ingest.reindex_budget == 500
    assert (ingest.index_cfg.window, ingest.index_cfg.sampling.fps) == (64, 1.0)


# ---- 4. the Dockerfile against the Makefile and pyproject.toml --------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [l for l in DOCKERFILE.read_text().splitlines() if not l.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1]) for l in joined.splitlines() if l.strip()]


def docker_args() -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in dockerfile() if i == "ARG")


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def pip_installs(args: dict[str, str]) -> list[str]:
    """The requirement arguments of every `pip install` in the Dockerfile, ARGs expanded."""
    found = []
    for instr, rest in dockerfile():
        if instr != "RUN":
            continue
        for command in re.split(r"&&|;|\|\||\bthen\b", rest):
            words = command.split()
            if words[:2] != ["pip", "install"]:
                continue
            words = iter(words[2:])
            for w in words:
                if w in ("--index-url", "-r", "--extra-index-url"):
                    next(words)
                elif not w.startswith("-"):
                    found.append(expand(w.strip("'\""), args))
    return found


def makefile_pins() -> tuple[str, set[str]]:
    """(torch version, extras) of the Makefile's setup."""
    text = (REPO / "Makefile").read_text()
    [torch] = re.findall(r"pip install -q torch==([\w.]+)", text)
    [extras] = re.findall(r"pip install -q -e '\.\[([\w,]+)\]'", text)
    return torch, set(extras.split(","))


def pyproject_requirement(name: str) -> Requirement:
    [req] = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == name]
    return req


def test_dockerfile_torch_and_extras_are_the_makefiles():
    args = docker_args()
    torch, extras = makefile_pins()
    assert args["TORCH_VERSION"] == torch
    assert Version(torch) in pyproject_requirement("torch").specifier
    assert args["TORCH_CPU_INDEX"].endswith("/cpu")
    assert set(args["EXTRAS"].split(",")) == extras
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert extras | {"gpu"} <= optional.keys()
    assert re.search(r'extras="\$extras,gpu"', DOCKERFILE.read_text()), "the GPU variant adds the gpu extra"


def test_dockerfile_installs_only_pinned_or_declared_packages():
    """Everything comes from pyproject.toml (the project and its extras; the gpu extra via
    a requirements file made from it) but the two pins, and flash-attn's build tools."""
    args = docker_args()
    build_tools = {"packaging", "psutil", "ninja", "wheel"}  # flash-attn builds with --no-build-isolation
    installs = pip_installs(args)
    project = [i for i in installs if i.startswith(".[")]
    assert project == [".[${extras}]"], installs
    others = [Requirement(i) for i in installs if not i.startswith(".[")]
    assert {r.name for r in others} == {"torch", "ray"} | build_tools
    for r in others:
        if r.name in build_tools:
            assert not r.specifier, f"{r}: a build tool, not a pin"
    torch = next(r for r in others if r.name == "torch")
    assert str(torch.specifier) == f"=={args['TORCH_VERSION']}"
    ray, declared = next(r for r in others if r.name == "ray"), pyproject_requirement("ray")
    assert ray.extras == declared.extras and Version(args["RAY_VERSION"]) in declared.specifier
    assert str(ray.specifier) == f"=={args['RAY_VERSION']}"


def test_dockerfile_ray_is_the_manifests_ray():
    ray_version = docker_args()["RAY_VERSION"]
    assert {spec["rayVersion"] for _, spec in cluster_specs()} == {ray_version}


def test_dockerfile_base_user_and_sources():
    instructions = dockerfile()
    args = docker_args()
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert [a for i, a in instructions if i == "FROM"] == ["${PYTHON_IMAGE}"]
    assert Version("3.11") in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert any(i == "RUN" and "apt-get install" in a and "ffmpeg" in a for i, a in instructions)
    users = [a for i, a in instructions if i == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and uid != "0", "a numeric non-root user (runAsNonRoot can check it)"
    for where, pod in pod_specs():
        if any(c["image"].startswith(IMAGE_REPO) for c in pod["containers"]):
            assert str(pod["securityContext"]["runAsUser"]) == uid, where
    copied = {src for i, a in instructions if i == "COPY" for src in a.split()[:-1]}
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", PYPROJECT["project"]["readme"], "tests", "bench"} | packages <= copied
    ignore = [l for l in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    for src in copied:  # the last pattern matching a source must let it in
        verdicts = [p.startswith("!") for p in ignore if fnmatch.fnmatch(src, p.lstrip("!"))]
        assert verdicts and verdicts[-1], f"{src} is left out of the build context"


# ---- 5. one pinned image tag ------------------------------------------------------------

def images(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["image"]] if isinstance(node.get("image"), str) else []) + [
            i for v in node.values() for i in images(v)]
    return [i for v in node for i in images(v)] if isinstance(node, list) else []


def test_images_are_pinned_and_framekv_tags_are_the_projects_version():
    everywhere = [i for m in MANIFESTS for i in images(m.doc)]
    for image in everywhere:
        name, _, tag = image.rpartition(":")
        assert "/" not in tag and tag and tag != "latest" or "@sha256:" in image, f"{image}: not pinned"
    ours = {i for i in everywhere if i.startswith(IMAGE_REPO + ":")}
    assert ours == {f"{IMAGE_REPO}:{VERSION}", f"{IMAGE_REPO}:{VERSION}-gpu"}
    for where, spec in cluster_specs():
        for name, group in ray_groups(spec):
            for c in group["template"]["spec"]["containers"]:
                assert c["image"] == f"{IMAGE_REPO}:{VERSION}" + ("-gpu" if gpus(c) else ""), f"{where} {name}"
    texts = " ".join(p.read_text() for p in INFRA.rglob("*") if p.is_file())
    assert set(re.findall(re.escape(IMAGE_REPO) + r":([\w.-]+)", texts)) == {VERSION, f"{VERSION}-gpu"}


# ---- the CronJob's script against a stand-in kubectl ------------------------------------

FAKE_KUBECTL = r'''
"""A stand-in kubectl: the calls the CronJob's script makes, answered from FAKE_KUBE."""
import json, os, re, sys
from pathlib import Path
import yaml

state = Path(os.environ["FAKE_KUBE"])
args = sys.argv[1:]
with open(state / "calls.jsonl", "a") as log:
    log.write(json.dumps(args) + "\n")
opts = dict(zip(args, args[1:]))

def jsonpath(template, obj):
    def field(m):
        expr = m.group(1)
        if expr.startswith('"'):
            return json.loads(expr)
        value = obj
        for key in expr.strip(".").split("."):
            value = value.get(key, "") if isinstance(value, dict) else ""
        return str(value)
    return re.sub(r"\{([^}]*)\}", field, template)

def output(obj):
    out = opts.get("-o", "")
    print(jsonpath(out[len("jsonpath="):], obj) if out.startswith("jsonpath=") else json.dumps(obj), end="")

if args[:2] == ["get", "job"]:
    output({"metadata": {"name": args[2], "uid": "uid-1234"}})
elif args[:2] == ["get", "rayjob"]:
    path = state / "rayjobs" / f"{args[2]}.json"
    if not path.exists():
        sys.exit(f'Error from server (NotFound): rayjobs.ray.io "{args[2]}" not found')
    rayjob = json.loads(path.read_text())
    if "jobDeploymentStatus" in opts.get("-o", "") and "message" not in opts.get("-o", ""):
        states = json.loads((state / "states.json").read_text())
        now = states.pop(0)
        (state / "states.json").write_text(json.dumps(states))
        if now == "unreachable":
            sys.exit("Unable to connect to the server")
        deployment, job = now.split("/")
        rayjob["status"] = {"jobDeploymentStatus": deployment, "jobStatus": job, "reason": "AppFailed",
                            "message": "Job entrypoint command failed with exit code 3"}
        path.write_text(json.dumps(rayjob))
    output(rayjob)
elif args[0] == "create" and "--dry-run=client" in args:
    output(yaml.safe_load(Path(opts["-f"]).read_text()))
elif args[0] == "create" and opts.get("-f") == "-":
    rayjob = json.load(sys.stdin)
    (state / "rayjobs").mkdir(exist_ok=True)
    (state / "rayjobs" / f"{rayjob['metadata']['name']}.json").write_text(json.dumps(rayjob))
    print(f"rayjob.ray.io/{rayjob['metadata']['name']} created")
else:
    sys.exit(f"fake kubectl: unexpected call {args}")
'''


@dataclass
class ScriptRun:
    code: int
    output: str
    calls: list[list[str]]
    rayjobs: dict[str, dict]


def run_cronjob_script(tmp_path: Path, states: list[str], existing: bool = False) -> ScriptRun:
    cronjob = one("CronJob", "framekv-nightly")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = cronjob["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "template"]
    configmap = one("ConfigMap", next(v for v in cronjob["volumes"] if v["name"] == "template")["configMap"]["name"])
    state, bin_dir, template = tmp_path / "kube", tmp_path / "bin", tmp_path / "template"
    for d in (state / "rayjobs", bin_dir, template):
        d.mkdir(parents=True)
    for key, text in configmap["data"].items():
        (template / key).write_text(text)
    (state / "states.json").write_text(json.dumps(states))
    job_name = "framekv-nightly-29500000"
    if existing:  # a retried pod: the first one created the RayJob
        (state / "rayjobs" / f"{job_name}-ray.json").write_text(json.dumps({"metadata": {"name": f"{job_name}-ray"}}))
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f"#!{sys.executable}\n{FAKE_KUBECTL}")
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")  # the script polls every 60 s
    for exe in (kubectl, bin_dir / "sleep"):
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    script = container["args"][0].replace(mount["mountPath"] + "/", f"{template}/")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_KUBE": str(state), "JOB_NAME": job_name,
           "HOME": str(tmp_path)}
    run = subprocess.run([*container["command"], script], env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(l) for l in (state / "calls.jsonl").read_text().splitlines()]
    rayjobs = {p.stem: json.loads(p.read_text()) for p in (state / "rayjobs").glob("*.json")}
    return ScriptRun(run.returncode, run.stdout + run.stderr, calls, rayjobs)


def fail_job_codes() -> set[int]:
    policy = one("CronJob", "framekv-nightly")["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]
    return {c for rule in policy["rules"] if rule["action"] == "FailJob" for c in rule["onExitCodes"]["values"]}


needs_jq = pytest.mark.skipif(shutil.which("jq") is None, reason="jq (the kubectl image has it) is not installed")


@needs_jq
def test_cronjob_script_creates_an_owned_rayjob_and_succeeds_with_it(tmp_path):
    run = run_cronjob_script(tmp_path, ["Initializing/", "Running/RUNNING", "Complete/SUCCEEDED"])
    assert run.code == 0, run.output
    [(name, rayjob)] = run.rayjobs.items()
    assert name == "framekv-nightly-29500000-ray"
    assert rayjob["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "framekv-nightly-29500000", "uid": "uid-1234"}]
    [cron] = of_kind("RayCronJob")
    assert rayjob["spec"] == cron.doc["spec"]["jobTemplate"]
    assert len(name) <= 47, "KubeRay's limit on RayJob names"
    created = {"apiVersion": rayjob["apiVersion"], "kind": rayjob["kind"], "spec": rayjob["spec"],
               "metadata": {k: v for k, v in rayjob["metadata"].items() if k != "ownerReferences"}}
    assert ray_errors(created) == []


@needs_jq
def test_cronjob_script_fails_the_job_when_the_rayjob_fails(tmp_path):
    run = run_cronjob_script(tmp_path, ["Running/RUNNING", "Failed/FAILED"])
    assert run.code in fail_job_codes(), run.output
    assert "AppFailed" in run.output and "exit code 3" in run.output


@needs_jq
def test_cronjob_script_reattaches_after_a_pod_retry(tmp_path):
    run = run_cronjob_script(tmp_path, ["Running/RUNNING", "Complete/SUCCEEDED"], existing=True)
    assert run.code == 0, run.output
    assert not [c for c in run.calls if c[0] == "create"], "a retried pod must not start a second run"


@needs_jq
def test_cronjob_script_leaves_api_errors_to_the_job_retry(tmp_path):
    run = run_cronjob_script(tmp_path, ["unreachable"])
    assert run.code != 0 and run.code not in fail_job_codes(), run.output


@needs_jq
def test_cronjob_role_allows_exactly_the_calls_the_script_makes(tmp_path):
    calls = run_cronjob_script(tmp_path, ["Complete/SUCCEEDED"]).calls
    used = {(c[0], c[1] if c[0] == "get" else "rayjob") for c in calls if "--dry-run=client" not in c}
    resources = {"rayjob": "rayjobs", "job": "jobs"}
    role = one("Role", "framekv-nightly-scheduler")
    allowed = {(verb, res) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    assert {(verb, resources[r]) for verb, r in used} == allowed
    binding = one("RoleBinding", "framekv-nightly-scheduler")
    pod = one("CronJob", "framekv-nightly")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"]}]
    assert one("ServiceAccount", pod["serviceAccountName"])


def test_shell_scripts_parse():
    scripts = {str(p.relative_to(REPO)): p.read_text() for p in sorted(INFRA.rglob("*.sh"))}
    for m in of_kind("CronJob"):
        [c] = m.doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        scripts[m.where] = c["args"][0]
    for name, text in scripts.items():
        run = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert run.returncode == 0, f"{name}: {run.stderr}"
    for name in ("up.sh", "down.sh"):
        assert os.access(INFRA / "local" / name, os.X_OK), f"infra/local/{name} is not executable"


# ---- infra/local/up.sh and down.sh ------------------------------------------------------

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_alive(pid: int) -> bool:
    """Does session `pid` (up.sh starts each process with setsid) have a live process?"""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[3]) == pid and fields[0] != "Z":
                return True
    return False


@pytest.mark.slow
def test_local_cluster_up_is_idempotent_and_down_stops_only_it():
    state = Path(tempfile.mkdtemp(prefix="fkv-", dir="/tmp"))  # short: Ray's socket paths have a limit
    ray_port, dash, client, agent_head, agent_worker, s3_port = _free_ports(6)
    env = {**os.environ, "FRAMEKV_LOCAL_STATE": str(state), "FRAMEKV_VENV_BIN": str(Path(sys.executable).parent),
           "FRAMEKV_RAY_PORT": str(ray_port), "FRAMEKV_DASHBOARD_PORT": str(dash), "FRAMEKV_CLIENT_PORT": str(client),
           "FRAMEKV_HEAD_AGENT_PORT": str(agent_head), "FRAMEKV_WORKER_AGENT_PORT": str(agent_worker),
           "FRAMEKV_S3_PORT": str(s3_port), "FRAMEKV_WORKER_CPUS": "1", "FRAMEKV_OBJECT_STORE_BYTES": "80000000"}
    up, down = [str(INFRA / "local" / n) for n in ("up.sh", "down.sh")]
    pids: dict[str, int] = {}
    try:
        first = subprocess.run([up], env=env, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stdout + first.stderr
        pids = {n: int((state / f"{n}.pid").read_text().split()[0]) for n in ("head", "worker", "s3")}
        assert all(_session_alive(p) for p in pids.values())
        token = (state / "auth_token").read_text().strip()
        request = urllib.request.Request(f"http://127.0.0.1:{dash}/api/v0/nodes",
                                         headers={"Authorization": f"Bearer {token}"})
        nodes = json.load(urllib.request.urlopen(request, timeout=10))["data"]["result"]["result"]
        alive = [n for n in nodes if n["state"] == "ALIVE"]
        assert sorted(n["resources_total"].get("CPU", 0) for n in alive) == [0, 1], "a head for drivers, a worker"
        with pytest.raises(urllib.error.HTTPError):  # the token is required
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/v0/nodes", timeout=10)
        import boto3

        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="framekv-local")
        assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["framekv-local"]

        again = subprocess.run([up], env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and again.stdout.count(": running") == 3, again.stdout + again.stderr
        assert {n: int((state / f"{n}.pid").read_text().split()[0]) for n in pids} == pids

        stopped = subprocess.run([down], env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0 and stopped.stdout.count(": stopped") == 3, stopped.stdout + stopped.stderr
        assert not any(_session_alive(p) for p in pids.values())
        twice = subprocess.run([down], env=env, capture_output=True, text=True, timeout=60)
        assert twice.returncode == 0 and twice.stdout.count(": not running") == 3, twice.stdout + twice.stderr
    finally:
        subprocess.run([down], env=env, capture_output=True, timeout=120)
        for pid in pids.values():
            if _session_alive(pid):
                os.killpg(pid, signal.SIGKILL)
        shutil.rmtree(state, ignore_errors=True)
