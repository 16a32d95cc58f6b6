"""The cluster files hold together: ray_cluster.yaml passes Ray's own launcher validation, the
KubeRay manifests and the Dockerfile say what the project pins, and every job under jobs/ loads
with the config class of the verb that runs it (with its cluster overrides too)."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

import ranray.config as config_module
from ranray.commands import submit as submit_cmd

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_PIN = next(d for d in PYPROJECT["project"]["optional-dependencies"]["train"]
               if d.startswith("ray[")).split("==")[1]
IMAGE = f"ghcr.io/ranray/ranray:{VERSION}-cu130"
JOBS = ("demo", "ferplus_prepare", "pretrain_r50", "ferplus_ran_r50", "ferplus_ran_paper", "tune_asha")
SHARED = "/mnt/shared"


def load_yaml(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


# ---------------------------------------------------------------------------------------------
# ray_cluster.yaml
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher_config() -> dict:
    return load_yaml("ray_cluster.yaml")


def test_ray_cluster_yaml_passes_rays_launcher_validation(launcher_config):
    """What `ray up` does before it talks to the cloud: fill defaults, merge setup commands,
    check the docker section, then the JSON schema (ray-schema.json) and Ray's own rules."""
    import copy

    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(launcher_config))
    validate_config(prepared)

    # The same validation refuses a config with a misspelt key: the check above can fail.
    broken = copy.deepcopy(launcher_config)
    broken["head_start_commands"] = broken.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_ray_cluster_layout(launcher_config):
    types = launcher_config["available_node_types"]
    head = types[launcher_config["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # the head runs drivers only
    gpu, cpu = types["gpu"], types["cpu"]
    assert gpu["resources"]["GPU"] == 8 and gpu["node_config"]["InstanceType"].startswith(("p4d", "p5"))
    assert "GPU" not in cpu["resources"] and cpu["resources"]["CPU"] > 0
    for node_type in (gpu, cpu):
        assert node_type["min_workers"] == 0 < node_type["max_workers"]  # autoscaled from zero
    assert launcher_config["max_workers"] >= gpu["max_workers"] + cpu["max_workers"]
    from ray._private.label_utils import validate_node_labels

    for node_type in types.values():  # what `ray start` checks the labels with on each node
        validate_node_labels(node_type["labels"])


def test_ray_cluster_token_auth_and_private_dashboard(launcher_config):
    head_start = " ".join(launcher_config["head_start_ray_commands"])
    worker_start = " ".join(launcher_config["worker_start_ray_commands"])
    for start in (head_start, worker_start):
        assert re.search(r"RAY_AUTH_MODE=token ray start", start)
    # Ray's default token path on every node, copied from the machine that runs `ray up`.
    assert launcher_config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # The head's private address (its first address), never every interface.
    assert "--dashboard-host=$(hostname -I | awk '{print $1}')" in head_start
    assert "0.0.0.0" not in head_start


def test_ray_cluster_image_and_shared_storage(launcher_config):
    docker = launcher_config["docker"]
    assert docker["image"] == IMAGE
    assert f"-v {SHARED}:{SHARED}" in docker["run_options"]
    init = " ".join(launcher_config["initialization_commands"])
    assert "mount -t nfs4" in init and SHARED in init


# ---------------------------------------------------------------------------------------------
# cluster/Dockerfile
# ---------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and heredoc bodies attached."""
    lines = (REPO / "cluster" / "Dockerfile").read_text().splitlines()
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<'?(\w+)'?\s*$", line)
        if heredoc:
            body = []
            while lines[i] != heredoc.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            line += "\n" + "\n".join(body)
        word, _, rest = line.partition(" ")
        out.append((word, rest))
    return out


def test_dockerfile_pins_versions():
    instructions = dockerfile_instructions()
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "LABEL", "WORKDIR", "USER", "ENTRYPOINT", "CMD"}
    assert {word for word, _ in instructions} <= known
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-cudnn-runtime-ubuntu\d\d\.04", args["CUDA_IMAGE"])
    assert re.fullmatch(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+", args["UV_IMAGE"])
    assert args["PYTHON_VERSION"] == "3.11"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["BOTO3_VERSION"])
    assert args["DALI_CUDA"] == "130"
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert froms == ["${UV_IMAGE} AS uv", "${CUDA_IMAGE}"]
    run = "\n".join(rest for word, rest in instructions if word == "RUN")
    # Dependencies come from pyproject.toml's pins; the CUDA 12 DALI from the project's extra.
    assert 'project["dependencies"] + project["optional-dependencies"]["train"]' in run
    assert '["optional-dependencies"]["cuda12"]' in run
    assert "uv pip uninstall nvidia-dali-cuda130" in run
    assert "shape_predictor_68_face_landmarks.dat" in run and "ranray version" in run
    # Every package named on a pip line outside the requirement files carries a version.
    for spec in re.findall(r'"(boto3==[^"]+)"', run):
        assert "==" in spec
    labels = " ".join(rest for word, rest in instructions if word == "LABEL")
    assert f'org.opencontainers.image.version="{VERSION}"' in labels
    # The image ends as the non-root user whose uid the launcher config's storage expects.
    users = [rest for word, rest in instructions if word == "USER"]
    assert users[-1] == "ray" and "--uid 1000" in run


def test_dockerfile_context_leaves_out_local_state():
    ignored = (REPO / "cluster" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "mlruns"} <= set(ignored)


# ---------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------


def test_kuberay_raycluster_manifest():
    rc = load_yaml("cluster/kuberay/raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    spec = rc["spec"]
    assert spec["rayVersion"] == RAY_PIN
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "8"
    pod_specs = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]
    for pod in pod_specs:
        container = pod["containers"][0]
        assert container["image"] == IMAGE
        assert {"name": "shared", "mountPath": SHARED} in container["volumeMounts"]
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": "ranray-shared"}} in pod["volumes"]
        assert pod["securityContext"]["runAsUser"] == 1000


def test_kuberay_rayjob_runs_the_submit_tools_command():
    job = load_yaml("cluster/kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert spec["rayClusterSpec"]["rayVersion"] == RAY_PIN
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/opt/ranray"
    words = shlex.split(spec["entrypoint"])
    sidecar = submit_cmd.load_job(REPO, "ferplus_ran_r50")
    assert words[:4] == ["ranray", sidecar.verb, "--config", sidecar.config.as_posix()]
    assert set(sidecar.overrides) <= set(words[4:])  # the same cluster settings as `ranray submit`
    config_module.load_config(config_module.TrainConfig, REPO / sidecar.config, words[4:])
    for pod in ([spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]]
                + [g["template"]["spec"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]):
        assert pod["containers"][0]["image"] == IMAGE


# ---------------------------------------------------------------------------------------------
# jobs/
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("job", JOBS)
def test_job_config_loads_with_its_verbs_config_class(job, monkeypatch):
    spec = submit_cmd.load_job(REPO, job)
    assert (REPO / spec.config).is_file()
    monkeypatch.chdir(REPO)
    cls = getattr(config_module, submit_cmd.VERB_CONFIGS[spec.verb])
    config_module.load_config(cls, spec.config)  # as `ranray <verb> --config` reads it locally
    config_module.load_config(cls, spec.config, spec.overrides)  # and on the cluster
    # Every path the cluster side sets is on the shared storage that all nodes mount.
    paths = [o.split("=", 1)[1] for o in spec.overrides
             if o.split("=", 1)[0] in ("run.storage_path", "storage_path", "data.dir", "out")]
    paths += [spec.args[i + 1] for i, a in enumerate(spec.args) if a == "--workdir"]
    assert paths and all(p.startswith(SHARED) for p in paths)


@pytest.mark.parametrize("job", JOBS)
def test_job_runtime_env_is_valid_for_ray(job):
    from ray.runtime_env import RuntimeEnv

    spec = submit_cmd.load_job(REPO, job)
    RuntimeEnv(**spec.runtime_env)  # Ray's own type checks of the fields
    assert set(spec.runtime_env) <= {"env_vars", "excludes", "pip", "uv", "py_modules", "config"}
    assert "/.venv/" in spec.runtime_env["excludes"] and "/.git/" in spec.runtime_env["excludes"]


def test_every_job_has_a_config_and_a_cluster_sidecar():
    sidecars = {p.stem for p in (REPO / "jobs" / "cluster").glob("*.yaml")}
    assert set(JOBS) <= sidecars
    for name in sidecars:
        assert (REPO / "jobs" / f"{name}.yaml").is_file()


def test_submit_dry_run_prints_the_ray_job_submit_command(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    from ranray.cli import main

    assert main(["submit", "ferplus_ran_r50", "epochs=3", "--dry-run", "--address", "http://10.0.0.5:8265",
                 "--submission-id", "ferplus-1"]) == 0
    shown = capsys.readouterr().out.strip().splitlines()[0]
    assert shown.startswith("$ ray job submit --address http://10.0.0.5:8265 --working-dir ")
    words = shlex.split(shown[2:])
    assert words[words.index("--submission-id") + 1] == "ferplus-1"
    entry = words[words.index("--") + 1:]
    assert entry[:4] == ["ranray", "train", "--config", "jobs/ferplus_ran_r50.yaml"]
    assert entry[-1] == "epochs=3"  # the user's overrides come last, so they win
    assert "run.storage_path=/mnt/shared/ranray/runs" in entry


def test_submit_refuses_bad_jobs_before_contacting_a_cluster(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    from ranray.cli import main

    assert main(["submit", "no_such_job", "--dry-run"]) == 2
    assert "known jobs: " in capsys.readouterr().err
    assert main(["submit", "ferplus_ran_r50", "optim.lrr=0.1", "--dry-run"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    # No token anywhere: refused with a message that says where to put one.
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["submit", "ferplus_ran_r50", "--address", "http://127.0.0.1:9"]) == 2
    assert "no auth token" in capsys.readouterr().err


def test_local_sh_is_valid_bash_with_usage():
    local_sh = REPO / "cluster" / "local.sh"
    subprocess.run(["bash", "-n", str(local_sh)], check=True)
    usage = subprocess.run(["bash", str(local_sh)], capture_output=True, text=True)
    assert usage.returncode == 2 and "up [N]" in usage.stdout and "down" in usage.stdout


def test_submit_shared_root_and_verb_args_anywhere_on_the_line(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    from ranray.cli import main

    assert main(["submit", "demo", "--dry-run", "--shared-root", "/data/nfs", "epochs=1",
                 "--verb-args=--n 160", "batch_size=8"]) == 0
    words = shlex.split(capsys.readouterr().out.strip().splitlines()[0][2:])
    assert words[words.index("--") + 1:] == ["ranray", "demo", "--workdir", "/data/nfs/ranray/demo", "--n", "160",
                                             "--config", "jobs/demo.yaml", "epochs=1", "batch_size=8"]
