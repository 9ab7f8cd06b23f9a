"""deploy/ checked offline: every YAML parses; Kubernetes objects validate against the Kubernetes schemas
(kubernetes-validate), KubeRay objects by their pod templates and their KubeRay fields; the Ray cluster-launcher
config against Ray's own schema; every entrypoint, option, spec file, image and path named exists in the project
and the job specs validate against today's models. Each check is also shown refusing a broken copy."""

from __future__ import annotations

import copy
import shlex
import shutil

import pytest
import yaml

from tests.deploy import manifests as m

pytest.importorskip("kubernetes_validate", reason="dev extra kubernetes-validate (offline Kubernetes schemas)")

OBJECTS = m.k8s_objects()
BUILTIN = [(p, d) for p, d in OBJECTS if not d["apiVersion"].startswith("ray.io/")]
KUBERAY = [(p, d) for p, d in OBJECTS if d["apiVersion"].startswith("ray.io/")]
RAYJOBS = [d for _, d in KUBERAY if d["kind"] == "RayJob"]


def ids(items):
    return [f"{p.name}:{d['kind']}/{d['metadata']['name']}" for p, d in items]


def by_kind(kind: str, name: str) -> dict:
    return next(copy.deepcopy(d) for _, d in OBJECTS if d["kind"] == kind and d["metadata"]["name"] == name)


def test_deploy_has_every_piece():
    names = {p.relative_to(m.DEPLOY).as_posix() for p in m.DEPLOY.rglob("*") if p.is_file()}
    assert {"README.md", "docker/Dockerfile", "docker/Dockerfile.cuda", "cluster/aws.yaml",
            "k8s/kustomization.yaml", "k8s/specs/distill-gpu.yaml"} <= names
    kinds = {d["kind"] for _, d in OBJECTS}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "PersistentVolumeClaim"} <= kinds
    groups = {t for d in (d for _, d in KUBERAY) for t, _ in m.pod_templates(d)}
    assert {"head", "worker:cpu", "worker:gpu"} <= groups


@pytest.mark.parametrize("path", m.yaml_files(), ids=lambda p: p.relative_to(m.DEPLOY).as_posix())
def test_every_yaml_parses(path):
    docs = m.load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize(("path", "doc"), BUILTIN, ids=ids(BUILTIN))
def test_kubernetes_objects_validate_against_the_schema(path, doc):
    assert m.validate_builtin(doc) == []


@pytest.mark.parametrize(("path", "doc"), KUBERAY, ids=ids(KUBERAY))
def test_kuberay_objects_check(path, doc):
    assert m.check_kuberay(doc) == []


def _set(doc, path, value):
    *parents, last = path
    for key in parents:
        doc = doc[key]
    if value is KeyError:
        del doc[last]
    else:
        doc[last] = value


CPU = ["spec", "rayClusterSpec", "workerGroupSpecs", 0]
HEAD = ["spec", "rayClusterSpec", "headGroupSpec"]


@pytest.mark.parametrize(("kind", "name", "path", "value", "expected"), [
    ("RayJob", "distill-cpu", CPU + ["replicas"], 9, "outside [minReplicas 8, maxReplicas 8]"),
    ("RayJob", "distill-cpu", CPU + ["minReplicas"], 9, "minReplicas 9 > maxReplicas 8"),
    ("RayJob", "distill-cpu", HEAD + ["rayStartParams", "num-cpus"], 0, "rayStartParams.num-cpus must be a string"),
    ("RayJob", "distill-cpu", CPU + ["groupName"], KeyError, "groupName must be a DNS label"),
    ("RayJob", "distill-cpu", CPU + ["groupName"], "CPU_workers", "groupName must be a DNS label"),
    ("RayJob", "distill-cpu", ["spec", "entrypoint"], KeyError, "spec.entrypoint is required"),
    ("RayJob", "distill-cpu", ["spec", "clusterSelector"], {"ray.io/cluster": "x"}, "exactly one of"),
    ("RayJob", "distill-cpu", ["spec", "shutdownAfterJobFinish"], True, "unknown field 'shutdownAfterJobFinish'"),
    ("RayJob", "distill-cpu", ["spec", "submissionMode"], "K8sMode", "submissionMode 'K8sMode'"),
    ("RayJob", "distill-cpu", ["spec", "rayClusterSpec", "rayVersion"], "2.9.0", "is not the ray pin"),
    ("RayJob", "distill-cpu", HEAD + ["template", "spec", "containers", 0, "imagePullPolicy"], 3, "imagePullPolicy"),
    ("RayJob", "distill-cpu", HEAD + ["template", "spec", "containers", 0, "volumeMount"], [], "volumeMount"),
    ("RayJob", "distill-cpu", HEAD + ["template", "spec", "volumes"], [], "mounts unknown volume 'ray-logs'"),
    ("RayCluster", "distillery", ["spec", "workerGroupSpec"], [], "unknown field 'workerGroupSpec'"),
    ("RayCluster", "distillery", ["spec", "workerGroupSpecs", 1, "groupName"], "cpu", "duplicate groupName"),
    ("RayCluster", "distillery", ["spec", "headGroupSpec", "template", "spec", "containers"], [], "no containers"),
])
def test_kuberay_check_refuses_a_broken_copy(kind, name, path, value, expected):
    doc = by_kind(kind, name)
    _set(doc, path, value)
    problems = m.check_kuberay(doc)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(("kind", "name", "path", "value", "expected"), [
    ("Deployment", "distillery-api", ["spec", "replicas"], "one", "replicas"),
    ("Deployment", "distillery-api", ["spec", "template", "spec", "containers", 0, "readinessProbe", "httpGet"],
     {"path": "/healthz"}, "port"),
    ("Service", "distillery-api", ["spec", "ports", 0, "prot"], 8000, "prot"),
    ("PersistentVolumeClaim", "distillery-data", ["spec", "accessModes"], "ReadWriteMany", "accessModes"),
])
def test_kubernetes_schema_refuses_a_broken_copy(kind, name, path, value, expected):
    doc = by_kind(kind, name)
    _set(doc, path, value)
    problems = m.validate_builtin(doc)
    assert any(expected in p for p in problems), problems


def test_kustomize_renders_valid_objects_when_kubectl_is_installed():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (its built-in kustomize renders deploy/k8s offline)")
    import subprocess

    out = subprocess.run([kubectl, "kustomize", str(m.K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    specs = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "distillery-specs")
    assert set(specs["data"]) == set(m.generated_configmaps()["distillery-specs"])
    for doc in docs:
        assert (m.check_kuberay(doc) if doc["apiVersion"].startswith("ray.io/") else m.validate_builtin(doc)) == []


# ------------------------------------------------------------------------------- the Ray cluster launcher


def launcher_problems(config: dict) -> list[str]:
    """Ray's own check: fill in the provider's defaults, then validate against ray-schema.json."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError) as exc:
        return [str(exc).splitlines()[0]]
    return []


def test_cluster_launcher_config_validates_against_rays_schema():
    config = m.load_all(m.DEPLOY / "cluster" / "aws.yaml")[0]
    assert launcher_problems(config) == []
    assert {"head", "cpu", "gpu"} == set(config["available_node_types"])


@pytest.mark.parametrize(("path", "value", "expected"), [
    (["available_node_types", "gpu", "docker", "image"], "x", "Additional properties"),
    (["available_node_types", "cpu", "resources"], {"CPU": "32"}, "is not of type 'integer'"),
    (["docker", "run_option"], [], "Additional properties"),
])
def test_cluster_launcher_check_refuses_a_broken_copy(path, value, expected):
    config = m.load_all(m.DEPLOY / "cluster" / "aws.yaml")[0]
    _set(config, path, value)
    problems = launcher_problems(config)
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------------------------- entrypoints and specs


def entrypoints() -> list[tuple[str, dict, list[str]]]:
    """(where, object, argv) of every command a manifest runs in the project's image."""
    out = [(f"RayJob/{d['metadata']['name']}", d, shlex.split(d["spec"]["entrypoint"])) for d in RAYJOBS]
    for _, doc in BUILTIN:
        for _, template in m.pod_templates(doc):
            out += [(f"{doc['kind']}/{doc['metadata']['name']}", doc, c["command"]) for c in m.containers(template)
                    if "command" in c]
    return out


ENTRYPOINTS = entrypoints()


@pytest.mark.parametrize(("where", "doc", "argv"), ENTRYPOINTS, ids=[e[0] for e in ENTRYPOINTS])
def test_entrypoints_exist_with_their_options(where, doc, argv):
    assert m.check_command(argv) == []


@pytest.mark.parametrize(("argv", "expected"), [
    (["python", "-m", "pipeline", "runn", "spec.yaml"], "does not exist"),
    (["python", "-m", "pipeline", "run", "spec.yaml", "--adress", "auto"], "unknown option --adress"),
    (["distillery", "train", "s.yaml", "--worker", "2"], "unknown option --worker"),
    (["distillery", "serve", "--ray-addr", "http://h:8265"], "unknown option --ray-addr"),
    (["distillery", "jobs", "launch", "s.yaml"], "no such distillery command"),
    (["ray", "start"], "not an entrypoint of this project"),
])
def test_command_check_refuses_what_does_not_exist(argv, expected):
    problems = m.check_command(argv)
    assert any(expected in p for p in problems), problems


def head_template(doc: dict) -> dict:
    return (doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"])["headGroupSpec"]["template"]


def mounted_file(template: dict, path: str) -> str | None:
    """The ConfigMap key a pod sees at ``path`` (driver pods mount distillery-specs at SPEC_MOUNT), else None."""
    spec = template["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        for mount in c.get("volumeMounts", []):
            cm = volumes.get(mount["name"], {}).get("configMap")
            prefix = mount["mountPath"].rstrip("/") + "/"
            if cm and path.startswith(prefix):
                key = path[len(prefix):]
                return key if key in m.generated_configmaps().get(cm["name"], {}) else None
    return None


@pytest.mark.parametrize("doc", RAYJOBS, ids=[d["metadata"]["name"] for d in RAYJOBS])
def test_rayjob_specs_are_mounted_on_the_driver_and_validate(doc):
    from pipeline.config import load_config

    model, path = m.spec_argument(shlex.split(doc["spec"]["entrypoint"]))
    key = mounted_file(head_template(doc), path)
    assert key is not None, f"{path} is not a file of a mounted, generated ConfigMap on the head (driver) pod"
    source = m.generated_configmaps()["distillery-specs"][key]
    load_config(source, model)


@pytest.mark.parametrize("name", sorted(m.generated_configmaps()["distillery-specs"]))
def test_every_shipped_spec_validates(name):
    from pipeline.config import load_config
    from pipeline.spec import JobSpec
    from trainers.student import StudentConfig

    path = m.generated_configmaps()["distillery-specs"][name]
    assert path.is_file()
    load_config(path, StudentConfig if name.startswith("student") else JobSpec)


def test_a_spec_path_outside_the_configmap_is_refused():
    doc = by_kind("RayJob", "distill-cpu")
    assert mounted_file(head_template(doc), "/etc/distillery/specs/distill-cpu.yaml") == "distill-cpu.yaml"
    assert mounted_file(head_template(doc), "/etc/distillery/specs/distill-tpu.yaml") is None
    assert mounted_file(head_template(doc), "/data/distill-cpu.yaml") is None


def test_a_spec_that_breaks_todays_jobspec_is_refused(tmp_path):
    from pipeline.config import ConfigError, load_config
    from pipeline.spec import JobSpec

    data = yaml.safe_load((m.K8S / "specs" / "distill-cpu.yaml").read_text())
    data["resources"]["threads"] = 2
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="resources.threads"):
        load_config(tmp_path / "spec.yaml", JobSpec)


def cpu_capacity(doc: dict) -> list[float]:
    """CPUs of every worker pod a RayJob starts (head excluded: num-cpus 0 keeps actors off it)."""
    out = []
    for group in doc["spec"]["rayClusterSpec"].get("workerGroupSpecs", []):
        limit = m.cpus(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        out += [limit] * group.get("replicas", 0)
    return out


@pytest.mark.parametrize("doc", [d for d in RAYJOBS if "gpu" not in d["metadata"]["name"]],
                         ids=lambda d: d["metadata"]["name"])
def test_rayjob_clusters_fit_the_workers_their_spec_asks_for(doc):
    """Actors that cannot be placed would leave a job waiting forever: every worker (its threads reserved as
    CPUs) must fit on one pod, and all of them on the cluster at once."""
    from pipeline.config import load_config

    argv = shlex.split(doc["spec"]["entrypoint"])
    model, path = m.spec_argument(argv)
    cfg = load_config(m.generated_configmaps()["distillery-specs"][mounted_file(head_template(doc), path)], model)
    if model.__name__ == "JobSpec":
        workers, threads = cfg.resources.workers, cfg.resources.threads_per_worker
    else:
        workers = int(argv[argv.index("--workers") + 1]) if "--workers" in argv else cfg.workers
        threads = cfg.threads_per_worker
    assert head_template(doc) and doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    slots = sum(int(pod // threads) for pod in cpu_capacity(doc))
    assert slots >= workers, f"{workers} workers × {threads} CPUs do not fit on pods {cpu_capacity(doc)}"


def test_the_gpu_rayjob_fits_the_actors_its_spec_asks_for():
    """The GPU job's actors reserve what pipeline.device.actor_resources computes from its spec: all of them
    must fit on the GPU pods at once (GPUs and CPUs both), or the job waits forever for a GPU."""
    from pipeline.config import load_config
    from pipeline.device import actor_resources
    from pipeline.spec import JobSpec

    doc = by_kind("RayJob", "distill-gpu")
    _, path = m.spec_argument(shlex.split(doc["spec"]["entrypoint"]))
    spec = load_config(m.generated_configmaps()["distillery-specs"][mounted_file(head_template(doc), path)], JobSpec)
    need = actor_resources(device=spec.teacher.device, threads_per_worker=spec.resources.threads_per_worker,
                           gpus_per_worker=spec.resources.gpus_per_worker)
    assert need["num_gpus"] > 0
    slots = 0
    for group in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus, cpus = int(limits.get("nvidia.com/gpu", 0)), m.cpus(limits["cpu"])
        slots += group.get("replicas", 0) * min(int(gpus / need["num_gpus"] + 1e-9), int(cpus // need["num_cpus"]))
    assert slots >= spec.resources.workers, f"{spec.resources.workers} GPU actors do not fit: {slots} slots"


# ------------------------------------------------------------------------------- images and Dockerfiles


def images() -> list[tuple[str, dict]]:
    """(image, container) of every container in deploy/k8s and every image of the cluster launcher."""
    out = []
    for _, doc in OBJECTS:
        for _, template in m.pod_templates(doc):
            pods = m.containers(template) + list(template["spec"].get("initContainers", []))
            out += [(c["image"], c) for c in pods]
    config = m.load_all(m.DEPLOY / "cluster" / "aws.yaml")[0]
    out.append((config["docker"]["image"], {}))
    out += [(t["docker"]["worker_image"], {"resources": {"limits": {"nvidia.com/gpu": 1}}})
            for t in config["available_node_types"].values() if "docker" in t]
    return out


def test_every_image_is_built_by_a_dockerfile_here():
    for image, container in images():
        dockerfile = m.image_dockerfile(image)
        assert dockerfile is not None and dockerfile.is_file(), f"{image}: no Dockerfile in deploy/docker builds it"
        assert f"-t {image} " in dockerfile.read_text(), f"{dockerfile.name} does not document the tag {image}"
        wants_gpu = "nvidia.com/gpu" in (container.get("resources") or {}).get("limits", {})
        assert wants_gpu == image.endswith("-cuda"), f"{image} on a container with GPU={wants_gpu}"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_copy_what_exists_and_install_like_the_readme(name):
    assert m.check_dockerfile(m.DEPLOY / "docker" / name) == []


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("COPY trainers /src/trainers", "COPY trainer /src/trainers", "COPY source trainer does not exist"),
    ("COPY trainers /src/trainers", "", "package trainers (pyproject) is never copied"),
    ("COPY pyproject.toml README.md /src/", "COPY pyproject.toml bench /src/", "excluded by"),
    ("torch==2.13.0", "torch==2.12.0", "pyproject pins"),
    ("USER 1000", "USER root", "non-root USER"),
    ("python:3.11-slim-bookworm", "python:3.12-slim-bookworm", "not Python 3.11"),
])
def test_dockerfile_check_refuses_a_broken_copy(tmp_path, old, new, expected):
    source = m.DEPLOY / "docker" / "Dockerfile"
    broken = tmp_path / "Dockerfile"
    text = source.read_text()
    assert old in text
    broken.write_text(text.replace(old, new))
    shutil.copy(f"{source}.dockerignore", f"{broken}.dockerignore")
    problems = m.check_dockerfile(broken)
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------------------------- the job service


def api() -> tuple[dict, dict, dict]:
    deployment, service = by_kind("Deployment", "distillery-api"), by_kind("Service", "distillery-api")
    return deployment, service, deployment["spec"]["template"]["spec"]["containers"][0]


def test_api_environment_names_real_settings():
    from pipeline.storage import ENDPOINT_ENV
    from services.config import Settings

    _, _, container = api()
    known = {f"DISTILLERY_{name.upper()}" for name in Settings.model_fields} | {ENDPOINT_ENV}
    names = [e["name"] for e in container["env"] if e["name"].startswith("DISTILLERY_")]
    assert names and set(names) <= known, set(names) - known
    assert "DISTILLERY_TOKEN" in names


def test_api_probes_hit_a_real_get_route_on_a_declared_port(tmp_path):
    from services.config import Settings
    from services.main import create_app

    app = create_app(Settings(state_dir=tmp_path, ray_address="http://127.0.0.1:9"))
    gets = {path for path, ops in app.openapi()["paths"].items() if "get" in ops}
    deployment, service, container = api()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] in gets and http["port"] in ports
    assert container["command"][container["command"].index("--port") + 1] == str(ports["http"])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])


def test_api_points_at_the_ray_cluster_and_shares_its_spec_files_with_the_driver():
    """The service writes <state_dir>/specs/<id>.json and Ray's driver, on the head, reads that path: both pods
    must mount the same claim (and subPath) there."""
    from services.config import Settings

    _, _, container = api()
    env = {e["name"]: e.get("value") for e in container["env"]}
    cluster = by_kind("RayCluster", "distillery")
    assert env["DISTILLERY_RAY_ADDRESS"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    specs_dir = str(Settings(state_dir=env["DISTILLERY_STATE_DIR"]).specs_dir)

    def source(template: dict, path: str) -> tuple | None:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for c in template["spec"]["containers"]:
            for mount in c.get("volumeMounts", []):
                if mount["mountPath"] == path:
                    return volumes[mount["name"]]["persistentVolumeClaim"]["claimName"], mount.get("subPath")
        return None

    deployment = by_kind("Deployment", "distillery-api")
    on_api = source(deployment["spec"]["template"], specs_dir)
    assert on_api is not None and on_api == source(head_template(cluster), specs_dir)
    claims = {d["metadata"]["name"]: d for _, d in OBJECTS if d["kind"] == "PersistentVolumeClaim"}
    assert "ReadWriteMany" in claims[on_api[0]]["spec"]["accessModes"]


def test_every_claim_configmap_and_secret_named_exists_or_is_documented():
    claims = {d["metadata"]["name"] for _, d in OBJECTS if d["kind"] == "PersistentVolumeClaim"}
    configmaps = set(m.generated_configmaps()) | {d["metadata"]["name"] for _, d in OBJECTS if d["kind"] == "ConfigMap"}
    readme = (m.DEPLOY / "README.md").read_text()
    for _, doc in OBJECTS:
        for role, template in m.pod_templates(doc):
            for v in template["spec"].get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims, (doc["metadata"]["name"], role)
                if "configMap" in v:
                    assert v["configMap"]["name"] in configmaps, (doc["metadata"]["name"], role)
            for c in m.containers(template):
                refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
                refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                         if "secretKeyRef" in e.get("valueFrom", {})]
                for name in refs:
                    assert f"kubectl create secret generic {name}" in readme, f"{name}: not in deploy/README.md"
    for resource in m.kustomization()["resources"]:
        assert (m.K8S / resource).is_file()
