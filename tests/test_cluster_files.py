"""The cluster files hold together: ray_cluster.yaml passes Ray's own launcher validation, the
KubeRay manifests and the Dockerfile say what the project pins, every job under jobs/ loads
with the config class of the verb that runs it (with its cluster overrides too), and the team's
MLflow server runs where the files say (its config loads; every Ray node and pod gets its URI and
a credentials file, never a password; no SQLite store on the shared volume)."""

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
IMAGE_PROJECT = "/opt/ranray"  # where cluster/Dockerfile copies the repository
HEAD_PRIVATE_IP = "$(hostname -I | awk '{print $1}')"  # the head's address, as its commands find it


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


# ---------------------------------------------------------------------------------------------
# The tracking server (issue 28): ray_cluster.yaml, cluster/kuberay/mlflow.yaml, docs
# ---------------------------------------------------------------------------------------------


def image_path_in_repo(path: str) -> Path:
    """A file the image holds under /opt/ranray, in this checkout (the Dockerfile copies the repo)."""
    assert path.startswith(IMAGE_PROJECT + "/"), path
    copies = [rest for word, rest in dockerfile_instructions() if word == "COPY"]
    assert f". {IMAGE_PROJECT}" in copies
    relative = path[len(IMAGE_PROJECT) + 1:]
    ignored = (REPO / "cluster" / "Dockerfile.dockerignore").read_text().split()
    assert relative.split("/")[0] not in ignored
    return REPO / relative


def server_command(words: list[str]) -> tuple[Path, list[str]]:
    """(the config file in this checkout, the overrides) of `ranray track server --config C k=v...`."""
    assert words[:4] == ["ranray", "track", "server", "--config"], words
    return image_path_in_repo(words[4]), words[5:]


def load_server_config(config: Path, overrides: list[str]):
    return config_module.load_config(config_module.TrackingServerConfig, config, overrides)


def start_env(command: str) -> dict[str, str]:
    """The variables set on a `ray start` command line (VAR=value words before `ray start`)."""
    line = " ".join(command.replace(HEAD_PRIVATE_IP, "$HEAD_PRIVATE_IP").split())
    found = re.search(r"((?:\w+=\S+ )+)ray start", line)
    assert found, command
    return dict(word.split("=", 1) for word in found.group(1).split())


def head_server_start(launcher_config: dict) -> tuple[int, str]:
    commands = launcher_config["head_start_ray_commands"]
    starts = [i for i, c in enumerate(commands) if "ranray track server" in c and "setsid" in c]
    assert len(starts) == 1, commands
    return starts[0], commands[starts[0]]


def test_head_runs_the_tracking_server_from_its_config(launcher_config):
    commands = launcher_config["head_start_ray_commands"]
    index, start = head_server_start(launcher_config)
    ray_start = next(i for i, c in enumerate(commands) if "ray start --head" in c)
    assert index > ray_start  # Ray first: the log goes beside Ray's, in the session's log folder
    line = " ".join(start.split())
    # In the background, detached from `ray up`'s session, its log and pid in known places.
    words = shlex.split(re.search(r"setsid nohup (ranray track server [^>]*)>", line).group(1))
    log = re.search(r"LOG=(\S+);", line).group(1)
    assert log == "/tmp/ray/session_latest/logs/mlflow_server.log" and ">$LOG 2>&1 </dev/null &" in line
    pidfile = re.search(r"echo \$! > (\S+);", line).group(1)
    # `ray up` again: the server this file started is stopped (by its pid, once it is sure the
    # pid is that server's) before Ray and the new server start, so there is never a second one.
    stop = commands[0]
    assert commands[1] == "ray stop" and "ranray track server" in stop
    assert f"cat {pidfile}" in stop and "kill -TERM $PID" in stop and f"rm -f {pidfile}" in stop
    # A server that does not come up fails `ray up`, showing its log.
    assert "/health" in line and "tail -n 20 $LOG" in line and line.endswith("false; }")

    config, overrides = server_command(words)
    assert config == REPO / "cluster" / "mlflow_server.yaml"
    assert f"IP={HEAD_PRIVATE_IP};" in line and "host=$IP" in overrides  # the private address only
    cfg = load_server_config(config, [o.replace("$IP", "10.0.0.5") for o in overrides])
    assert cfg.host == "10.0.0.5" and f"http://$IP:{cfg.port}/health" in line
    # SQLite on the head's own disk, in a host folder bind-mounted into the container (a new
    # container keeps it), made on the host for the container's user.
    assert cfg.backend_uri == "" and not cfg.db_dir.startswith(SHARED)
    assert f"-v {cfg.db_dir}:{cfg.db_dir}" in launcher_config["docker"]["head_run_options"]
    init = " ".join(launcher_config["initialization_commands"])
    assert f"sudo mkdir -p {cfg.db_dir} && sudo chown 1000:1000 {cfg.db_dir}" in init
    # Artifacts and backups on the shared volume; the admin's password from a file the launcher
    # copies from the machine that runs `ray up`, deleted on the workers.
    assert cfg.artifacts.startswith(f"{SHARED}/ranray/") and cfg.backup_dir.startswith(f"{SHARED}/ranray/")
    secret_dir = str(Path(cfg.admin_password_file).parent)
    assert launcher_config["file_mounts"][secret_dir] == secret_dir
    assert f"rm -f {cfg.admin_password_file}" in launcher_config["worker_setup_commands"]


def test_every_ray_node_gets_the_tracking_uri_and_a_credentials_file(launcher_config):
    _, start = head_server_start(launcher_config)
    cfg = load_server_config(*server_command(shlex.split(
        re.search(r"setsid nohup (ranray track server [^>]*)>", " ".join(start.split())).group(1))))
    head = [start_env(c) for c in launcher_config["head_start_ray_commands"] if "ray start" in c]
    workers = [start_env(c) for c in launcher_config["worker_start_ray_commands"] if "ray start" in c]
    assert len(head) == len(workers) == 1
    # Ray's head: its own private address, as the server's host= and the dashboard have it;
    # workers: the head's address, which the launcher gives their commands as $RAY_HEAD_IP.
    assert head[0]["MLFLOW_TRACKING_URI"] == f"http://$HEAD_PRIVATE_IP:{cfg.port}"
    assert workers[0]["MLFLOW_TRACKING_URI"] == f"http://$RAY_HEAD_IP:{cfg.port}"
    for env in head + workers:
        assert env["RAY_AUTH_MODE"] == "token"
        # A path (in the folder file_mounts copies to every node), never a password.
        credentials = env["RANRAY_MLFLOW_CREDENTIALS"].replace("$HOME", "~")
        assert launcher_config["file_mounts"][str(Path(credentials).parent)]
        assert credentials != cfg.admin_password_file
        assert not set(env) & set(submit_cmd.SECRET_ENV_VARS)


def sqlite_on_shared(value: str) -> bool:
    return bool(re.search(r"sqlite:/+mnt/shared\b", value))


def yaml_strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in yaml_strings(k) + yaml_strings(v)]
    if isinstance(node, list):
        return [s for item in node for s in yaml_strings(item)]
    return [node] if isinstance(node, str) else []


def repo_yaml_files() -> list[Path]:
    skip = {".git", ".venv", "runs", "mlruns", "data", "node_modules"}
    return sorted(p for p in REPO.rglob("*.y*ml") if not skip & set(p.relative_to(REPO).parts))


def test_no_yaml_puts_a_sqlite_store_on_the_shared_volume():
    assert sqlite_on_shared("tracking.uri=sqlite:////mnt/shared/ranray/runs/x/mlflow.db")  # the check can fail
    assert not sqlite_on_shared("sqlite:///runs/x/mlflow.db")
    files = repo_yaml_files()
    assert REPO / "ray_cluster.yaml" in files and REPO / "cluster" / "kuberay" / "mlflow.yaml" in files
    for path in files:
        text = path.read_text()
        values = [s for doc in yaml.safe_load_all(text) for s in yaml_strings(doc)]
        assert not [v for v in values if sqlite_on_shared(v)], path
        assert not sqlite_on_shared(text), path  # comments too
    # Nor do the cluster files call the shared volume the home of "MLflow stores" any more.
    for path in ("ray_cluster.yaml", "cluster/kuberay/raycluster.yaml", "docs/CLUSTER.md"):
        assert "MLflow store" not in (REPO / path).read_text(), path


def mlflow_manifests() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / "mlflow.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


def secret_volumes(pod: dict) -> dict[str, str]:
    """volume name -> the Secret it mounts."""
    return {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}


def mount_of(container: dict, path: str) -> dict:
    """The volume mount that holds `path`."""
    mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, (path, container.get("volumeMounts"))
    return mounts[0]


def test_kuberay_mlflow_server_deployment_and_service():
    kinds = mlflow_manifests()
    assert set(kinds) == {"PersistentVolumeClaim", "Deployment", "Service"}
    deployment = kinds["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # one SQLite writer, one RWO volume
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 1000 and pod["terminationGracePeriodSeconds"] > 30
    (container,) = pod["containers"]
    assert container["image"] == IMAGE and "command" not in container  # the image's tini hands SIGTERM on
    config, overrides = server_command(container["args"])
    cfg = load_server_config(config, overrides)
    assert cfg.backend_uri == ""
    volumes = {v["name"]: v for v in pod["volumes"]}
    # db_dir: a ReadWriteOnce claim of its own (not the shared one)
    db_claim = volumes[mount_of(container, f"{cfg.db_dir}/mlflow.db")["name"]]["persistentVolumeClaim"]["claimName"]
    claim = kinds["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == db_claim != "ranray-shared"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # artifacts and backups: the shared claim the Ray pods mount at the same path
    for path in (cfg.artifacts, cfg.backup_dir):
        mount = mount_of(container, path)
        assert mount["mountPath"] == SHARED
        assert volumes[mount["name"]]["persistentVolumeClaim"] == {"claimName": "ranray-shared"}
    # the admin's password: a file from a Secret, nowhere in the pod's environment
    admin = mount_of(container, cfg.admin_password_file)
    assert admin["readOnly"] is True and secret_volumes(pod)[admin["name"]] == "ranray-mlflow-admin"
    assert cfg.admin_password_file == f"{admin['mountPath']}/password"
    assert not [e for e in container.get("env", []) if "PASSWORD" in e["name"].upper()]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"  # answered without credentials

    service = kinds["Service"]
    assert service["metadata"]["name"] == "ranray-mlflow" and service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    (container_port,) = container["ports"]
    assert port["port"] == cfg.port == container_port["containerPort"]
    assert port["targetPort"] in (cfg.port, container_port["name"])


def ray_pods() -> list[tuple[str, dict]]:
    cluster = load_yaml("cluster/kuberay/raycluster.yaml")["spec"]
    job = load_yaml("cluster/kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]
    return [(f"{name}:{group.get('groupName', 'head')}", group["template"]["spec"])
            for name, spec in (("raycluster", cluster), ("rayjob", job))
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]


def test_kuberay_ray_pods_log_to_the_service_with_a_mounted_credentials_file():
    kinds = mlflow_manifests()
    service = kinds["Service"]
    uri = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    pods = ray_pods()
    assert len(pods) == 5  # head, gpu and cpu of the RayCluster; head and gpu of the RayJob's
    for where, pod in pods:
        container = pod["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"]["value"] == uri, where
        credentials = env["RANRAY_MLFLOW_CREDENTIALS"]["value"]
        mount = mount_of(container, credentials)
        assert mount["readOnly"] is True
        assert secret_volumes(pod)[mount["name"]] == "ranray-mlflow-credentials", where
        assert not set(env) & set(submit_cmd.SECRET_ENV_VARS), where  # never a password in the environment
    runtime_env = yaml.safe_load(load_yaml("cluster/kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert not set(runtime_env.get("env_vars", {})) & set(submit_cmd.SECRET_ENV_VARS)


PASSWORD_ASSIGNMENT = re.compile(r"(?i)\b([\w.-]*password[\w.-]*)\s*=\s*([^\s,;)}\]`'\"]+)")
# A value that names where a password is, not the password itself.
PASSWORD_REFERENCE = re.compile(r"[$%~/<{]|^\w+_password$|^password$|^[\w.-]+\.ini$")


def password_literals(text: str) -> list[str]:
    return [m.group(0) for m in PASSWORD_ASSIGNMENT.finditer(text) if not PASSWORD_REFERENCE.match(m.group(2))]


def yaml_password_values(node) -> list:
    """Passwords written into a YAML document: {name: ...PASSWORD..., value: ...} (an env entry) or
    a ...password...: value key that is not a reference, anywhere in it."""
    if isinstance(node, list):
        return [found for item in node for found in yaml_password_values(item)]
    if not isinstance(node, dict):
        return []
    here = [node] if "PASSWORD" in str(node.get("name", "")).upper() and "value" in node else []
    here += [{k: v} for k, v in node.items() if "password" in str(k).lower() and isinstance(v, (str, int))
             and not PASSWORD_REFERENCE.match(str(v))]
    return here + [found for v in node.values() for found in yaml_password_values(v)]


def test_no_password_literal_in_the_cluster_files():
    # The checks can fail.
    assert password_literals("mlflow_tracking_password = hunter2hunter2hunter2")
    assert password_literals("MLFLOW_TRACKING_PASSWORD=s3cret-s3cret ray start")
    assert not password_literals("admin_password_file=~/.ranray/mlflow/admin_password")
    assert yaml_password_values(yaml.safe_load("env: [{name: MLFLOW_TRACKING_PASSWORD, value: x}]"))
    assert yaml_password_values(yaml.safe_load("stringData: {password: hunter2hunter2}"))
    assert not yaml_password_values(yaml.safe_load("{admin_password_file: /etc/ranray/mlflow-admin/password}"))
    files = ([REPO / "ray_cluster.yaml", REPO / "cluster" / "Dockerfile", REPO / "cluster" / "local.sh"]
             + sorted((REPO / "cluster").rglob("*.yaml")) + sorted((REPO / "jobs").rglob("*.yaml"))
             + sorted((REPO / "docs").glob("*.md")) + [REPO / "jobs" / "submit.sh"])
    for path in files:
        text = path.read_text()
        assert not password_literals(text), (path, password_literals(text))
        if path.suffix == ".yaml":
            for doc in yaml.safe_load_all(text):
                assert not yaml_password_values(doc), path
                # Secrets are made with kubectl from files (docs/CLUSTER.md), never kept in the repo.
                assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), path


def doc_commands(path: Path, programs: tuple[str, ...]) -> list[list[str]]:
    """The command lines of `programs` in the shell blocks of a markdown file (continuations
    joined, comments dropped), also those inside `ray exec CONFIG '...'`."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    found = []
    for line in lines:
        for program in programs:
            for match in re.finditer(rf"(?:^|[\s'(])({re.escape(program)} [^'#|&]*)", line):
                found.append(shlex.split(match.group(1)))
    return found


def test_docs_tracking_commands_are_the_real_cli():
    from ranray.cli import build_parser

    parser = build_parser()
    docs = REPO / "docs" / "CLUSTER.md"
    track = doc_commands(docs, (".venv/bin/ranray track", "ranray track"))
    actions = {(words[2] if words[0].endswith("ranray") else None) for words in track}
    assert {"server", "backup", "user"} <= actions
    for words in track:
        args = parser.parse_args(words[1:])  # argparse exits on an unknown option or action
        if args.action == "user":
            assert args.credentials and args.user_action in ("add", "grant")
            if args.user_action == "grant":
                assert args.permission in ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
        else:
            load_server_config(image_path_in_repo(args.config), args.overrides)
    submits = [w for w in doc_commands(docs, ("jobs/submit.sh",)) if "--tracking-credentials" in w]
    assert submits
    for words in submits:
        merged = submit_cmd.parse_items(parser.parse_args(["submit", *words[1:]]))
        spec = submit_cmd.load_job(REPO, merged.job)
        assert submit_cmd.tracking_overrides(spec, merged.tracking_credentials) == [
            f"tracking.credentials_file={merged.tracking_credentials}"]
