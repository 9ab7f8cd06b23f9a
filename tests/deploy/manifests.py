"""Offline checks of everything under ``deploy/``: each returns a list of problems (empty: fine), so a test can
show a check passes on the shipped files and refuses a deliberately broken copy.

Kubernetes built-in kinds validate against the JSON schemas the ``kubernetes-validate`` package ships. No
offline schema exists for KubeRay's CRDs, so their pod templates are validated as Kubernetes
``PodTemplateSpec``s and the KubeRay fields around them are checked here against the field names of
KubeRay's ``ray.io/v1`` Go types (``raycluster_types.go``, ``rayjob_types.go``).
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.31"  # oldest Kubernetes these manifests target; the package maps it to its nearest schema
SPEC_MOUNT = "/etc/distillery/specs"  # where pods mount the distillery-specs ConfigMap

RAYCLUSTER_SPEC_KEYS = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                        "autoscalerOptions", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions",
                        "managedBy"}
HEAD_GROUP_KEYS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP_KEYS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                     "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"}
AUTOSCALER_KEYS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
                   "idleTimeoutSeconds", "upscalingMode", "version"}
RAYJOB_SPEC_KEYS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


# --------------------------------------------------------------------------------------------- loading


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def k8s_objects() -> list[tuple[Path, dict]]:
    """Every Kubernetes object under deploy/k8s (job specs and the kustomization are not objects)."""
    return [(p, doc) for p in yaml_files() if p.parent == K8S and p.name != "kustomization.yaml"
            for doc in load_all(p)]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))


def generated_configmaps() -> dict[str, dict[str, Path]]:
    """ConfigMaps the kustomization generates: name → {key: source file} (key = the file's base name)."""
    out = {}
    for gen in kustomization().get("configMapGenerator", []):
        out[gen["name"]] = {Path(f).name: K8S / f for f in gen.get("files", [])}
    return out


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def pinned(package: str) -> str:
    """The version pyproject.toml pins a dependency to with ``==`` (extras ignored)."""
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([^\s;]+)", dep.strip())
        if m:
            return m.group(2)
    raise KeyError(f"{package} is not pinned with == in pyproject.toml")


# --------------------------------------------------------------------------------------------- Kubernetes


def validate_builtin(doc: dict) -> list[str]:
    """A built-in kind against the offline Kubernetes schema (strict: unknown fields are errors)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "(root)"
        return [f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {where}: {exc.message}"]
    return []


def validate_pod_template(template: dict, where: str) -> list[str]:
    """A pod template inside a CRD, as the PodTemplateSpec of a core/v1 ``PodTemplate`` object."""
    problems = validate_builtin({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                                 "template": template})
    problems = [f"{where}: {p}" for p in problems]
    if not (template.get("spec") or {}).get("containers"):
        problems.append(f"{where}: no containers")
    return problems + check_volume_mounts(template, where)


def check_volume_mounts(template: dict, where: str) -> list[str]:
    """Every volumeMount names a volume of its pod (the schema cannot see that)."""
    spec = template.get("spec") or {}
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    return [f"{where}: container {c.get('name')} mounts unknown volume {m.get('name')!r}"
            for c in spec.get("containers") or [] for m in c.get("volumeMounts") or [] if m.get("name") not in volumes]


def _unknown(obj: dict, allowed: set[str], where: str) -> list[str]:
    return [f"{where}: unknown field {k!r}" for k in sorted(set(obj) - allowed)]


def _replicas(group: dict, where: str) -> list[str]:
    problems = []
    values = {k: group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")}
    for key, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            problems.append(f"{where}: {key} must be an integer ≥ 0, got {value!r}")
    if problems:
        return problems
    lo, n, hi = values["minReplicas"] or 0, values["replicas"], values["maxReplicas"]
    if hi is not None and lo > hi:
        problems.append(f"{where}: minReplicas {lo} > maxReplicas {hi}")
    if n is not None and (n < lo or (hi is not None and n > hi)):
        problems.append(f"{where}: replicas {n} outside [minReplicas {lo}, maxReplicas {hi}]")
    return problems


def _start_params(params, where: str) -> list[str]:
    if params is None:
        return []
    if not isinstance(params, dict):
        return [f"{where}: rayStartParams must be a mapping"]
    return [f"{where}: rayStartParams.{k} must be a string, got {type(v).__name__} {v!r}"
            for k, v in params.items() if not isinstance(v, str)]


def check_raycluster_spec(spec: dict, where: str) -> list[str]:
    """The KubeRay RayClusterSpec fields we use, and every pod template in it."""
    if not isinstance(spec, dict):
        return [f"{where}: must be a mapping"]
    problems = _unknown(spec, RAYCLUSTER_SPEC_KEYS, where)
    if "rayVersion" in spec and spec["rayVersion"] != pinned("ray"):
        problems.append(f"{where}: rayVersion {spec['rayVersion']!r} is not the ray pin {pinned('ray')!r}")
    problems += _unknown(spec.get("autoscalerOptions") or {}, AUTOSCALER_KEYS, f"{where}.autoscalerOptions")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict) or "template" not in head:
        problems.append(f"{where}: headGroupSpec.template is required")
    else:
        problems += _unknown(head, HEAD_GROUP_KEYS, f"{where}.headGroupSpec")
        problems += _start_params(head.get("rayStartParams"), f"{where}.headGroupSpec")
        problems += validate_pod_template(head["template"], f"{where}.headGroupSpec.template")
    names = []
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        at = f"{where}.workerGroupSpecs[{i}]"
        problems += _unknown(group, WORKER_GROUP_KEYS, at)
        name = group.get("groupName")
        if not isinstance(name, str) or not DNS_LABEL.match(name):
            problems.append(f"{at}: groupName must be a DNS label, got {name!r}")
        names.append(name)
        problems += _replicas(group, at)
        problems += _start_params(group.get("rayStartParams"), at)
        if "template" not in group:
            problems.append(f"{at}: template is required")
        else:
            problems += validate_pod_template(group["template"], f"{at}.template")
    if len(names) != len(set(names)):
        problems.append(f"{where}: duplicate groupName in {names}")
    return problems


def check_kuberay(doc: dict) -> list[str]:
    """A RayCluster or RayJob (apiVersion ray.io/v1)."""
    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
    where = f"{kind}/{name}"
    problems = [] if doc.get("apiVersion") == "ray.io/v1" else [f"{where}: apiVersion must be ray.io/v1"]
    if not isinstance(name, str) or not DNS_LABEL.match(name):
        problems.append(f"{where}: metadata.name must be a DNS label")
    spec = doc.get("spec") or {}
    if kind == "RayCluster":
        return problems + check_raycluster_spec(spec, f"{where}.spec")
    if kind != "RayJob":
        return problems + [f"{where}: not a KubeRay kind this check knows"]
    problems += _unknown(spec, RAYJOB_SPEC_KEYS, f"{where}.spec")
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        problems.append(f"{where}: spec.entrypoint is required")
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        problems.append(f"{where}: exactly one of spec.rayClusterSpec and spec.clusterSelector")
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        problems.append(f"{where}: submissionMode {spec['submissionMode']!r} not in {sorted(SUBMISSION_MODES)}")
    for key in ("shutdownAfterJobFinishes", "suspend"):
        if key in spec and not isinstance(spec[key], bool):
            problems.append(f"{where}: spec.{key} must be a boolean")
    for key in ("ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds"):
        if key in spec and (not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < 0):
            problems.append(f"{where}: spec.{key} must be an integer ≥ 0")
    if "rayClusterSpec" in spec:
        problems += check_raycluster_spec(spec["rayClusterSpec"], f"{where}.spec.rayClusterSpec")
    if "submitterPodTemplate" in spec:
        problems += validate_pod_template(spec["submitterPodTemplate"], f"{where}.spec.submitterPodTemplate")
    return problems


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(role, template) of every pod a manifest runs: head, worker groups, Deployment pods."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob":
        spec = spec.get("rayClusterSpec") or {}
    if doc.get("kind") in ("RayCluster", "RayJob"):
        if "headGroupSpec" in spec:
            yield "head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs") or []:
            yield f"worker:{group.get('groupName')}", group["template"]
    elif doc.get("kind") in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        yield "pod", spec["template"]


def containers(template: dict) -> list[dict]:
    return list((template.get("spec") or {}).get("containers") or [])


def cpus(quantity) -> float:
    """A Kubernetes CPU quantity ("8", 8, "500m") in cores."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --------------------------------------------------------------------------------------------- commands


def check_command(argv: list[str]) -> list[str]:
    """The command names a real entrypoint of the project, with options that exist.

    ``python -m pipeline SUB …`` runs ``SUB --help`` through the real argparse front end; ``distillery SUB …``
    walks the typer app (click commands) and compares the ``--options`` used with the command's own.
    """
    import subprocess
    import sys

    if argv[:3] == ["python", "-m", "pipeline"]:
        if len(argv) < 4:
            return [f"{shlex.join(argv)}: no subcommand"]
        done = subprocess.run([sys.executable, "-m", "pipeline", argv[3], "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            return [f"{shlex.join(argv)}: `python -m pipeline {argv[3]}` does not exist: {done.stderr.strip()}"]
        known = set(re.findall(r"(--[a-z][-a-z0-9]*)", done.stdout))
        return [f"{shlex.join(argv)}: unknown option {o}" for o in _options(argv[4:]) if o not in known]
    if argv[:1] == ["distillery"]:
        import typer.main

        from distillery.cli import app

        command, rest = typer.main.get_command(app), argv[1:]
        while hasattr(command, "commands"):  # a group (typer vendors its own click: no isinstance)
            if not rest or rest[0] not in command.commands:
                return [f"{shlex.join(argv)}: no such distillery command {rest[:1]}"]
            command, rest = command.commands[rest[0]], rest[1:]
        known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
        return [f"{shlex.join(argv)}: unknown option {o}" for o in _options(rest) if o not in known]
    return [f"{shlex.join(argv)}: not an entrypoint of this project (python -m pipeline …, distillery …)"]


def _options(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--")]


def spec_models() -> dict[str, type]:
    """Which config model an entrypoint's file argument must validate against."""
    from pipeline.spec import JobSpec
    from trainers.student import StudentConfig

    return {"python -m pipeline run": JobSpec, "distillery distill": JobSpec, "distillery train": StudentConfig}


def spec_argument(argv: list[str]) -> tuple[type, str] | None:
    """(model, path) of the spec/config file an entrypoint reads, if it reads one."""
    for prefix, model in spec_models().items():
        words = prefix.split()
        if argv[:len(words)] == words and len(argv) > len(words):
            return model, argv[len(words)]
    return None


# --------------------------------------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, args = pending.strip().partition(" ")
            out.append((word.upper(), args.strip()))
            pending = ""
    return out


def check_dockerfile(path: Path) -> list[str]:
    """COPY sources exist and pass the .dockerignore; every package pyproject installs is copied; torch is pinned
    as in pyproject; the final stage runs as a non-root user on Python 3.11."""
    problems, copied = [], set()
    steps = dockerfile_instructions(path)
    ignore = Path(f"{path}.dockerignore")
    allowed = {line[1:].strip() for line in ignore.read_text().splitlines() if line.startswith("!")} \
        if ignore.is_file() else None
    for word, args in steps:
        if word != "COPY" or "--from=" in args:
            continue
        *sources, _dest = shlex.split(args)
        for src in sources:
            copied.add(src.rstrip("/"))
            if not (ROOT / src).exists():
                problems.append(f"{path.name}: COPY source {src} does not exist in the project")
            if allowed is not None and src.rstrip("/") not in allowed:
                problems.append(f"{path.name}: COPY source {src} is excluded by {ignore.name}")
    packages = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        if pattern.rstrip("*") not in copied:
            problems.append(f"{path.name}: package {pattern.rstrip('*')} (pyproject) is never copied")
    for needed in ("pyproject.toml", "README.md"):  # README: the project's `readme`, read by the build
        if needed not in copied:
            problems.append(f"{path.name}: {needed} is never copied")
    for m in re.finditer(r"torch==([^\s\"']+)", path.read_text(encoding="utf-8")):
        if m.group(1) != pinned("torch"):
            problems.append(f"{path.name}: torch=={m.group(1)}, pyproject pins {pinned('torch')}")
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    for w, a in steps:
        if w == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), a.split()[0])
            if image.startswith("python:") and not image.startswith("python:3.11"):
                problems.append(f"{path.name}: base {image} is not Python 3.11 (requires-python)")
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM"):]
    users = [a for w, a in final if w == "USER"]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        problems.append(f"{path.name}: the final stage must end on a non-root USER")
    for w, a in final:
        if w == "ENV":
            for lib in re.findall(r"/lib/(python[\d.]+)/", a):
                if lib != "python3.11":
                    problems.append(f"{path.name}: {lib} in ENV, the image's Python is 3.11")
    return problems


def image_dockerfile(image: str) -> Path | None:
    """The Dockerfile that builds an image name: ``distillery:<version>`` (CPU) or ``…-cuda``."""
    version = pyproject()["project"]["version"]
    return {f"distillery:{version}": DEPLOY / "docker" / "Dockerfile",
            f"distillery:{version}-cuda": DEPLOY / "docker" / "Dockerfile.cuda"}.get(image)
