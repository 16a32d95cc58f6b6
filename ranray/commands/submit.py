"""`ranray submit JOB [key=value ...]`: run a job from jobs/ on a Ray cluster with `ray job submit`.

A job is two files:
    jobs/<job>.yaml           the job's config, exactly what `ranray <verb> --config` reads
    jobs/cluster/<job>.yaml   how it runs on a cluster: the verb, its extra options (args), the
                              runtime_env, and overrides that point the config at the cluster's
                              shared storage

The config loader refuses unknown keys, so the cluster side stays out of the config file. The
verb's config is loaded here first (sidecar overrides, then the user's), so a bad key or value
fails on the laptop in a second, not on the cluster after the upload. Then:

    ray job submit --address A --working-dir . --runtime-env <file> --submission-id S --no-wait \
        -- ranray <verb> [args...] --config jobs/<job>.yaml <overrides...>

Paths on the cluster's shared storage are written in the sidecars under /mnt/shared (where
ray_cluster.yaml and the KubeRay manifests mount it); --shared-root points them elsewhere, e.g. at
a local folder for cluster/local.sh, whose nodes share this machine's disk.

Every cluster of this project runs with token authentication; the token comes from
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH (or --token-file) or ~/.ray/auth_token, as Ray reads it.

Tracking: the job logs to the cluster's MLflow server. --tracking-uri (default
$RANRAY_TRACKING_URI; else the nodes' own MLFLOW_TRACKING_URI) goes into the job's runtime_env: a
URI is no secret. The user's password never does (the dashboard shows every runtime_env): it is a
file on the cluster (a secret file, a Kubernetes Secret), named by --tracking-credentials, which
becomes the config key tracking.credentials_file (default: the nodes' $RANRAY_MLFLOW_CREDENTIALS).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HELP = "submit a job from jobs/ to a Ray cluster (ray job submit, token auth); print its id and how to follow it"

SIDECAR_DIR = "cluster"
SHARED_ROOT = "/mnt/shared"  # where every node of the cluster mounts the shared storage
SIDECAR_KEYS = {"verb", "args", "overrides", "runtime_env", "entrypoint_num_cpus"}
# The config each verb reads, for checking a job before it is submitted. A verb missing here is
# still submitted; its own command checks its config on the cluster.
VERB_CONFIGS = {
    "prepare": "PrepareConfig",
    "train": "TrainConfig",
    "demo": "TrainConfig",  # the demo's training job; it fills in data.dir and run.* itself
    "pretrain": "PretrainConfig",
    "tune": "TuneConfig",
}
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
TRACKING_URI_ENV = "RANRAY_TRACKING_URI"
TRACKED_VERBS = ("train", "demo", "pretrain", "tune")  # the verbs whose config has a tracking section
SECRET_ENV_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_AUTH_ADMIN_PASSWORD",
                   "AWS_SECRET_ACCESS_KEY")


def _options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--address", default=None,
                        help="the cluster's dashboard URL (default: $RAY_API_SERVER_ADDRESS, "
                             "$RAY_ADDRESS, else http://127.0.0.1:8265)")
    parser.add_argument("--working-dir", default=".",
                        help="the project directory uploaded with the job (default: .)")
    parser.add_argument("--verb-args", default="",
                        help="more options for the verb, as one shell-quoted string (e.g. "
                             "--verb-args='--n 160' for the demo)")
    parser.add_argument("--submission-id", default=None,
                        help="the job's id on the cluster (default: <job>-<time>-<random>)")
    parser.add_argument("--token-file", default=None,
                        help="a file holding the cluster's auth token (sets RAY_AUTH_TOKEN_PATH)")
    parser.add_argument("--shared-root", default=SHARED_ROOT,
                        help=f"where the nodes mount the shared storage; replaces {SHARED_ROOT} in the "
                             "job's cluster paths (e.g. a local folder for cluster/local.sh)")
    parser.add_argument("--tracking-uri", default=None,
                        help="the cluster's MLflow server, e.g. http://10.0.0.5:5000 (default: "
                             "$RANRAY_TRACKING_URI, else what the nodes set)")
    parser.add_argument("--tracking-credentials", default=None,
                        help="a credentials file ON THE CLUSTER for the job's MLflow user (sets "
                             "tracking.credentials_file; default: the nodes' $RANRAY_MLFLOW_CREDENTIALS)")
    parser.add_argument("--follow", "-f", action="store_true",
                        help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED")
    parser.add_argument("--dry-run", action="store_true", help="print the command, submit nothing")
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _options(parser)
    # REMAINDER, re-parsed in run(): options may come after or between the key=value items, which
    # plain positionals refuse.
    parser.add_argument("items", nargs=argparse.REMAINDER, metavar="JOB [key=value ...]",
                        help="a job name from jobs/ (e.g. ferplus_ran_r50) or jobs/<job>.yaml, then "
                             "config overrides, applied after the job's cluster overrides")


def parse_items(args: argparse.Namespace) -> argparse.Namespace:
    """The job, its overrides and the options, wherever the options were written."""
    from ranray.config import ConfigError

    parser = _options(argparse.ArgumentParser(prog="ranray submit", add_help=False))
    parser.add_argument("items", nargs="*")
    rest = parser.parse_intermixed_args(args.items)
    merged = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "items"})
    for key, value in vars(rest).items():
        if key != "items" and value != parser.get_default(key):
            setattr(merged, key, value)
    if not rest.items:
        raise ConfigError("which job? e.g. `ranray submit ferplus_ran_r50 epochs=10`")
    merged.job, merged.overrides = rest.items[0], rest.items[1:]
    return merged


@dataclass
class JobSpec:
    name: str
    config: Path  # relative to the working dir: the path the entrypoint uses on the cluster
    verb: str
    args: list[str] = field(default_factory=list)  # options for the verb, before --config
    overrides: list[str] = field(default_factory=list)
    runtime_env: dict[str, Any] = field(default_factory=dict)
    entrypoint_num_cpus: float | None = None


def load_job(working_dir: Path, job: str) -> JobSpec:
    """Read jobs/<job>.yaml's sidecar; the job may be given by name or as jobs/<job>.yaml."""
    import yaml

    from ranray.config import ConfigError

    name = Path(job).stem if job.endswith((".yaml", ".yml")) else job
    config = Path("jobs") / f"{name}.yaml"
    sidecar = Path("jobs") / SIDECAR_DIR / f"{name}.yaml"
    if not (working_dir / config).is_file() or not (working_dir / sidecar).is_file():
        known = sorted(p.stem for p in (working_dir / "jobs" / SIDECAR_DIR).glob("*.yaml")
                       if (working_dir / "jobs" / f"{p.stem}.yaml").is_file())
        raise ConfigError(f"no job '{name}' in {working_dir / 'jobs'} (needs {config} and {sidecar}); "
                          f"known jobs: {', '.join(known) or 'none'}")
    raw = yaml.safe_load((working_dir / sidecar).read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{sidecar} must hold a mapping")
    unknown = sorted(set(raw) - SIDECAR_KEYS)
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' in {sidecar} (known: {', '.join(sorted(SIDECAR_KEYS))})")
    verb = raw.get("verb")
    if not isinstance(verb, str) or not verb:
        raise ConfigError(f"{sidecar} needs 'verb', the ranray command that runs the job")
    args = raw.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or "--config" in args:
        raise ConfigError(f"{sidecar}: 'args' must be a list of strings (and not --config)")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ConfigError(f"{sidecar}: 'overrides' must be a list of key=value strings")
    runtime_env = raw.get("runtime_env") or {}
    if not isinstance(runtime_env, dict):
        raise ConfigError(f"{sidecar}: 'runtime_env' must be a mapping")
    if "working_dir" in runtime_env:
        raise ConfigError(f"{sidecar}: leave working_dir out of runtime_env; `ranray submit "
                          "--working-dir` sets it, and the config path is relative to it")
    cpus = raw.get("entrypoint_num_cpus")
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or cpus < 0):
        raise ConfigError(f"{sidecar}: 'entrypoint_num_cpus' must be a number >= 0")
    return JobSpec(name=name, config=config, verb=verb, args=list(args), overrides=list(overrides),
                   runtime_env=runtime_env, entrypoint_num_cpus=None if cpus is None else float(cpus))


def tracking_runtime_env(spec: JobSpec, uri: str) -> dict[str, Any]:
    """The job's runtime_env with the tracking server's URI; refuses credentials in it."""
    from ranray.config import ConfigError

    env_vars = dict(spec.runtime_env.get("env_vars") or {})
    leaked = sorted(k for k in env_vars if k in SECRET_ENV_VARS)
    if leaked:
        raise ConfigError(f"jobs/{SIDECAR_DIR}/{spec.name}.yaml: runtime_env sets {leaked[0]}, which the Ray "
                          "dashboard shows to everyone; give the job a credentials file on the cluster "
                          "(--tracking-credentials, docs/CLUSTER.md)")
    if not uri:
        return spec.runtime_env
    if not uri.startswith(("http://", "https://")):
        raise ConfigError(f"--tracking-uri must be the tracking server's http(s) address, got {uri!r} (a SQLite "
                          "store on the shared volume is unsafe: docs/CLUSTER.md)")
    return {**spec.runtime_env, "env_vars": {**env_vars, "MLFLOW_TRACKING_URI": uri}}


def tracking_overrides(spec: JobSpec, credentials: str | None) -> list[str]:
    from ranray.config import ConfigError

    if not credentials:
        return []
    if spec.verb not in TRACKED_VERBS:
        raise ConfigError(f"--tracking-credentials: job '{spec.name}' ({spec.verb}) logs nothing to MLflow")
    if not credentials.startswith("/"):
        raise ConfigError(f"--tracking-credentials must be an absolute path on the cluster, got {credentials!r}")
    return [f"tracking.credentials_file={credentials}"]


def check_config(spec: JobSpec, working_dir: Path, overrides: list[str]) -> None:
    """Load the job's config as its verb will, with the same overrides (ConfigError if wrong)."""
    import ranray.config as config_module

    cls_name = VERB_CONFIGS.get(spec.verb)
    if cls_name is None:
        return
    cwd = os.getcwd()
    os.chdir(working_dir)  # relative paths inside the config mean the same as on the cluster
    try:
        config_module.load_config(getattr(config_module, cls_name), spec.config, overrides)
    finally:
        os.chdir(cwd)


def find_ray() -> str:
    """The ray CLI of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "ray"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("ray")
    if not found:
        from ranray.config import ConfigError
        raise ConfigError("no `ray` command found (install ray[default])")
    return found


def default_address() -> str:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"


def auth_env(token_file: str | None) -> dict[str, str]:
    """The environment for the ray CLI: token mode on, and a token it can find."""
    from ranray.config import ConfigError

    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "token")
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file() or not path.read_text().strip():
            raise ConfigError(f"--token-file {path} is missing or empty")
        env["RAY_AUTH_TOKEN_PATH"] = str(path.resolve())
        env.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
    if env["RAY_AUTH_MODE"] != "token":
        return env
    if env.get("RAY_AUTH_TOKEN"):
        return env
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if not path.is_file() or not path.read_text().strip():
        raise ConfigError(
            f"no auth token for the cluster (looked in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, {path}); "
            "copy the cluster's token there, pass --token-file, or for cluster/local.sh run "
            "eval \"$(cluster/local.sh env)\"")
    return env


def submit_command(ray: str, address: str, working_dir: Path, runtime_env_file: str, submission_id: str,
                   spec: JobSpec, args: list[str], overrides: list[str]) -> list[str]:
    cmd = [ray, "job", "submit", "--address", address, "--working-dir", str(working_dir),
           "--runtime-env", runtime_env_file, "--submission-id", submission_id, "--no-wait"]
    if spec.entrypoint_num_cpus is not None:
        cmd += ["--entrypoint-num-cpus", f"{spec.entrypoint_num_cpus:g}"]
    return cmd + ["--", "ranray", spec.verb, *args, "--config", spec.config.as_posix(), *overrides]


def job_status(ray: str, address: str, submission_id: str, env: dict[str, str]) -> str:
    """The job's status as `ray job status` words it: a sentence for the final states, else
    "Status for job '<id>': <STATUS>"."""
    out = subprocess.run([ray, "job", "status", "--address", address, submission_id],
                         env=env, capture_output=True, text=True)
    text = out.stdout + out.stderr
    for pattern, status in ((r"Job '[^']+' succeeded", "SUCCEEDED"), (r"Job '[^']+' failed", "FAILED"),
                            (r"Job '[^']+' was stopped", "STOPPED")):
        if re.search(pattern, text):
            return status
    found = re.search(r"Status for job '[^']+': (\w+)", text)
    return found.group(1) if found else "UNKNOWN"


def run(args: argparse.Namespace) -> int:
    import yaml

    from ranray.config import ConfigError

    args = parse_items(args)
    working_dir = Path(args.working_dir).resolve()
    spec = load_job(working_dir, args.job)
    root = args.shared_root.rstrip("/") or "/"
    if not root.startswith("/"):
        raise ConfigError(f"--shared-root must be an absolute path, got {args.shared_root!r}")
    verb_args = [a.replace(SHARED_ROOT, root) for a in spec.args] + shlex.split(args.verb_args)
    overrides = [o.replace(SHARED_ROOT, root) for o in spec.overrides] + list(args.overrides)
    overrides += tracking_overrides(spec, args.tracking_credentials)
    spec.runtime_env = tracking_runtime_env(spec, args.tracking_uri or os.environ.get(TRACKING_URI_ENV, ""))
    check_config(spec, working_dir, overrides)

    address = args.address or default_address()
    submission_id = args.submission_id or (
        f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
    ray = find_ray()
    env = None if args.dry_run else auth_env(args.token_file)

    with tempfile.TemporaryDirectory(prefix="ranray-submit-") as tmp:
        runtime_env_file = os.path.join(tmp, f"{spec.name}.runtime_env.yaml")
        Path(runtime_env_file).write_text(yaml.safe_dump(spec.runtime_env, sort_keys=False))
        cmd = submit_command(ray, address, working_dir, runtime_env_file, submission_id, spec, verb_args,
                             overrides)
        shown = [*cmd[:cmd.index("--runtime-env")], "--runtime-env-json", json.dumps(spec.runtime_env),
                 *cmd[cmd.index("--runtime-env") + 2:]]
        shown[0] = "ray"
        print("$ " + shlex.join(shown), flush=True)
        if args.dry_run:
            return 0
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        print(f"ranray submit: ray job submit failed (exit {done.returncode})", file=sys.stderr)
        return 1

    print(f"submitted job '{spec.name}' as {submission_id} to {address}")
    print(f"  follow the logs:  ray job logs -f --address {address} {submission_id}")
    print(f"  status:           ray job status --address {address} {submission_id}")
    print(f"  stop:             ray job stop --address {address} {submission_id}")
    if not args.follow:
        return 0
    subprocess.run([ray, "job", "logs", "--follow", "--address", address, submission_id], env=env)
    # The log stream can end a moment before the job's status is final.
    deadline = time.monotonic() + 60
    status = job_status(ray, address, submission_id, env)
    while status not in TERMINAL_STATES and time.monotonic() < deadline:
        time.sleep(1)
        status = job_status(ray, address, submission_id, env)
    print(f"job {submission_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1
